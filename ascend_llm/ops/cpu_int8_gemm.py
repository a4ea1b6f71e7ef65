"""CPU int8 GEMM for `quant_matmul` (msModelSlim W8A8 static and W8A8_DYNAMIC): int8 x int8 ->
int32 through `torch._int_mm` (oneDNN's s8 x s8 -> s32 matmul), then the same float32 epilogue as
the reference in ops/cpu_int8.py, so the outputs are bit-identical to it. Tested against that
reference (tests/ops/test_cpu_int8_gemm.py).

Why this kernel (2-vCPU AMD EPYC Zen 4, one thread, SmolLM2 shapes, 2026-12-07): the int32
product of a [1, 576] x [576, 576] layer takes 6.5 us against 27 us for the fp32 F.linear and
98 us for the float64 reference; at 16 rows 39 / 145 / 335 us (gate_up 576 -> 1536: 15 / 73 / 242
at 1 row). oneDNN reads the weight [n, k] through its transposed view: no re-layout at load is
needed, and a [k, n] copy made once was slower at 1 row (14 us) and no faster at 16, so this
kernel has no `prepare`.

Exactness: with VNNI (vpdpbusd) or AMX, oneDNN accumulates in int32 without saturation and the
result equals the exact integer product. Without them (AVX2 / AVX-512 before Cascade Lake, or
ONEDNN_MAX_CPU_ISA=AVX2 / AVX512_CORE) oneDNN sums u8 x s8 pairs in saturating int16
(vpmaddubsw) and the result is off by up to ~3e5 at k = 4096 on random int8 data (measured). So
the kernel runs only where the CPU flags show an exact int8 dot product
(`CpuFeatures.int8_dot_unavailable`, capped by ASCEND_LLM_CPU_ISA) and a probe of torch._int_mm
on saturating inputs is exact in this process (which also catches ONEDNN_MAX_CPU_ISA); otherwise
it steps aside for the reference with the reason, which the registry logs and the audit records.
torch 2.13's CPU `_int_mm` also returns garbage for k = 1 (measured): such a call, and an empty
one, runs the reference.
"""
from __future__ import annotations

import functools
from typing import Any

import torch

from ascend_llm.ops.cpu_features import cpu_features
from ascend_llm.ops.cpu_int8 import (INT8_MAX, INT8_MIN, MAX_EXACT_K, dequant_dynamic, dequant_static,
                                     int8_matmul_reference)
from ascend_llm.ops.registry import Kernel, OpRegistry

NAME = "cpu.int8_quant_matmul"
MIN_K = 2                         # torch._int_mm on CPU is wrong at k = 1 (torch 2.13)
PRIORITY = 10
# (rows, k, n) of the exactness probe: the decode and GEMM paths, products that saturate int16 pairs
_PROBE_SHAPES = ((1, 64, 32), (4, 64, 32), (32, 256, 48))


def int8_gemm_unavailable() -> str | None:
    """Why the int8 GEMM cannot run exactly in this process (None: it can)."""
    return cpu_features().int8_dot_unavailable() or _probe_int_mm()


@functools.lru_cache(maxsize=1)
def _probe_int_mm() -> str | None:
    """None if torch._int_mm is exact here on inputs whose int16 pair sums saturate, else why not."""
    if not hasattr(torch, "_int_mm"):
        return "this torch build lacks torch._int_mm"
    for rows, k, n in _PROBE_SHAPES:
        for a, b in ((INT8_MAX, INT8_MAX), (INT8_MIN, INT8_MIN), (INT8_MAX, INT8_MIN)):
            q_x = torch.full((rows, k), a, dtype=torch.int8)                 # [rows, k]
            weight = torch.full((n, k), b, dtype=torch.int8)                # [n, k]
            try:
                got = torch._int_mm(q_x, weight.T)                          # [rows, n] int32
            except RuntimeError as exc:
                return f"torch._int_mm failed on CPU ({str(exc).strip().splitlines()[0][:160]})"
            if not bool((got == a * b * k).all()):
                return ("torch._int_mm is not exact on this CPU (oneDNN sums int8 pairs in saturating "
                        "int16 without VNNI / AMX; ONEDNN_MAX_CPU_ISA may cap it)")
    return None


def int8_matmul(q_x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Exact int32 q_x [T, k] int8 times weight [n, k] int8 -> [T, n] int32."""
    k = q_x.shape[-1]
    if q_x.dtype != torch.int8 or weight.dtype != torch.int8 or k > MAX_EXACT_K or k < MIN_K \
            or q_x.shape[0] == 0 or weight.shape[0] == 0:
        return int8_matmul_reference(q_x, weight)           # validates, or runs what _int_mm cannot
    if weight.shape[-1] != k:
        raise ValueError(f"int8 matmul: q_x {tuple(q_x.shape)} and weight {tuple(weight.shape)} disagree in k")
    return torch._int_mm(q_x.contiguous(), weight.contiguous().T)          # [T, n]


def quant_matmul(q_x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 out_dtype: torch.dtype, pertoken_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The `quant_matmul` op (ops.cpu_int8.quant_matmul's contract): static, `bias` = int32
    quant_bias added to the accumulator, `scale` = deq_scale [n]; with `pertoken_scale` [T],
    dynamic: `scale` = weight_scale [n], `bias` float [n]. Returns [T, n] out_dtype."""
    acc = int8_matmul(q_x, weight)                                          # [T, n] int32
    if pertoken_scale is None:
        return dequant_static(acc, scale, bias, out_dtype)
    return dequant_dynamic(acc, scale, pertoken_scale, bias, out_dtype)


def _supports(**traits: Any) -> str | None:
    return int8_gemm_unavailable()


def register(registry: OpRegistry) -> None:
    """Register the int8 GEMM on the CPU backend, above the float64 reference (cpu.quant_matmul)."""
    registry.register(Kernel("quant_matmul", "cpu", NAME, quant_matmul, _supports, priority=PRIORITY,
                             host_only=True))
