"""bfloat16 linear for CPUs where oneDNN has no bf16 (AVX2-only x86-64, e.g. AMD Zen 3; see
ops/cpu_features.py). Tested against a float64 reference in tests/ops/test_cpu_bf16.py.

There torch's bf16 F.linear runs a plain loop that costs the same per row whatever the batch,
while upcasting both operands to fp32 for MKL's GEMM costs a weight conversion per call and then
blocks well. Measured on a 2-vCPU EPYC (Zen 4) made AVX2-only by ONEDNN_MAX_CPU_ISA=AVX2
ATEN_CPU_CAPABILITY=avx2, medians, 3072 x 576 weight: bf16 97 us / 1.6 ms / 12.4 ms at 1 / 16 /
128 rows, upcast 0.22 / 0.85 / 3.4 ms; SmolLM2 prefill of 256 tokens 1.63 s -> 0.58 s, decode
unchanged (machine shared with other jobs). So up to UPCAST_MIN_ROWS - 1 rows run bf16 F.linear
and larger batches the fp32 GEMM. Both accumulate the exact fp32 products of the bf16 values in
fp32 and round once to bf16 (as oneDNN's bf16 linear does), so they agree within one bf16
rounding. The weight stays bf16 and dense (a tied LM head stays shared with the embedding).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ascend_llm.ops.cpu_features import cpu_features
from ascend_llm.ops.registry import Kernel, OpRegistry

UPCAST_MIN_ROWS = 9       # measured crossover: bf16 F.linear wins at 4 rows, the fp32 GEMM at 16
PRIORITY = 3              # under oneDNN (10, 5), above the reference F.linear (0)


def _supports(dtype: torch.dtype | None = None, **traits: Any) -> str | None:
    if dtype != torch.bfloat16:
        return f"dtype {dtype} is not bfloat16"
    if cpu_features().onednn_unavailable(torch.bfloat16) is None:
        return "oneDNN runs bfloat16 linear on this CPU"
    return None


def linear(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x: [num_tokens, in] bf16 -> [num_tokens, out] bf16 with layer.weight [out, in] bf16."""
    if x.shape[0] < UPCAST_MIN_ROWS:
        return F.linear(x, layer.weight, bias)
    out = F.linear(x.float(), layer.weight.float(), None if bias is None else bias.float())
    return out.to(x.dtype)


def register(registry: OpRegistry) -> None:
    registry.register(Kernel("linear", "cpu", "cpu.bf16_linear", linear, _supports, priority=PRIORITY))
