"""Float32 GEMV for CPU decode: our own small C++ kernel (csrc/cpu_gemv.cpp), built once per
machine with torch's C++ extension loader. Tested against ops/cpu.py's F.linear.

Decode at batch 1-4 is a matrix-vector product that has to stream every weight once. On the
2-vCPU AMD EPYC of CI, SmolLM2's 30 layers of weight-streaming went 20 -> 28 GB/s against
oneDNN's two-row trick (ops/cpu_onednn.py), and each call costs ~1 us instead of ~15 us; batch-1
decode went from 27 to 38 tok/s (benchmarks/bench_offline.py). Those EPYC numbers were taken
with a build that, lacking -fopenmp, ran on one thread; built with OpenMP (cpu_extension.py) it
streams 24.8 GB/s on a 2-vCPU Xeon against 13.2 before (MKL: 25.8), so `auto` keeps MKL on
Intel. The weight keeps its dense [out, in] layout (a tied LM head stays shared with the
embedding). Batches of more than four rows go to oneDNN's GEMM on the same dense weight (MKL's
F.linear on Intel CPUs, as in ops/cpu_linear_choice.py).

The kernel is built with the other C++ CPU kernels by ops/cpu_extension.py (once per machine,
cached); without a compiler it says why and the oneDNN / MKL kernels run instead.
`ASCEND_LLM_CPU_LINEAR=onednn|mkl` also steps it aside.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ascend_llm.ops import cpu_linear_choice
from ascend_llm.ops.cpu_extension import extension_unavailable
from ascend_llm.ops.cpu_linear_choice import ENV_VAR, linear_choice
from ascend_llm.ops.registry import Kernel, OpRegistry

MAX_ROWS = 4          # rows the kernel takes at once (csrc kMaxRows)


def gemv_unavailable() -> str | None:
    """Why the GEMV cannot run in this process (None: it can); see cpu_extension."""
    return extension_unavailable()


def _supports(dtype: torch.dtype | None = None, **traits: Any) -> str | None:
    if dtype != torch.float32:
        return f"dtype {dtype} is not float32"
    choice = linear_choice()
    if choice not in ("auto", "gemv"):
        return f"{ENV_VAR}={choice} selects another kernel"
    if choice == "auto" and cpu_linear_choice.cpu_vendor() == "GenuineIntel":
        # 2-vCPU Xeon, 2026-12-05: MKL's GEMV 20.9 ms vs ours 23.7 ms over SmolLM2's matrices
        return "MKL's GEMV is faster on Intel CPUs (set ASCEND_LLM_CPU_LINEAR=gemv to force it)"
    return gemv_unavailable()


def linear(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x: [num_tokens, in] -> [num_tokens, out]; 1-4 rows through the GEMV, more through a GEMM."""
    weight = layer.weight                                                   # [out, in] dense
    if 1 <= x.shape[0] <= MAX_ROWS and weight.is_contiguous():
        return torch.ops.ascend_llm_cpu.gemv(x, weight, bias)
    if cpu_linear_choice.cpu_vendor() != "GenuineIntel" and torch.backends.mkldnn.is_available():
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def register(registry: OpRegistry) -> None:
    registry.register(Kernel("linear", "cpu", "cpu.gemv_linear", linear, _supports, priority=20))
