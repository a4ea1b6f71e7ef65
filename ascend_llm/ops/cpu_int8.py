"""CPU reference kernels of the int8 ops (msModelSlim W8A8 / W8A8_DYNAMIC / W8A16).

They do the NPU's integer arithmetic exactly (`npu_quantize`, `npu_quant_matmul`,
`npu_dynamic_quant`, `npu_weight_quant_batchmatmul`).

Integer matmul: int8 x int8 products are at most 2^14 in magnitude, so an int32 accumulator over
k terms is bounded by k * 2^14. We compute it as a float64 matmul: every product and every partial
sum is an integer below 2^53 (for k < 2^39), so float64 represents each exactly and the result
is the exact integer whatever the summation order; then it is checked to fit int32 (k <= 2^17).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ascend_llm.ops.registry import REFERENCE_PRIORITY, Kernel, OpRegistry

INT8_MIN, INT8_MAX = -128, 127
MAX_EXACT_K = 1 << 17            # k * 2^14 < 2^31: the int32 accumulator cannot overflow


def quantize_per_tensor_reference(x: torch.Tensor, scale: torch.Tensor,
                                  offset: torch.Tensor) -> torch.Tensor:
    """Static asymmetric activation quantization: clamp(round(x / scale + offset), -128, 127).

    x: [T, k] float; scale, offset: scalars (float32). Rounding is half-to-even (torch.round),
    computed in float32.
    """
    q = torch.round(x.to(torch.float32) / scale.to(torch.float32) + offset.to(torch.float32))
    return q.clamp_(INT8_MIN, INT8_MAX).to(torch.int8)                       # [T, k]


def int8_matmul_reference(q_x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Exact int32 accumulation of q_x [T, k] int8 times weight [n, k] int8 -> [T, n] int32."""
    if q_x.dtype != torch.int8 or weight.dtype != torch.int8:
        raise ValueError(f"int8 matmul: got {q_x.dtype} x {weight.dtype}, both must be int8")
    k = q_x.shape[-1]
    if k > MAX_EXACT_K:
        raise ValueError(f"int8 matmul: k={k} could overflow the int32 accumulator (max {MAX_EXACT_K})")
    acc = q_x.to(torch.float64) @ weight.to(torch.float64).T                # exact, see module doc
    return acc.to(torch.int32)                                              # [T, n]


def quant_matmul_reference(q_x: torch.Tensor, weight: torch.Tensor, deq_scale: torch.Tensor,
                           quant_bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """W8A8 static: ((q_x @ weight.T) + quant_bias) * deq_scale, cast to out_dtype.

    q_x [T, k] int8, weight [n, k] int8, deq_scale [n] float32 values, quant_bias [n] int32.
    """
    return dequant_static(int8_matmul_reference(q_x, weight), deq_scale, quant_bias, out_dtype)


def dequant_static(acc: torch.Tensor, deq_scale: torch.Tensor, quant_bias: torch.Tensor | None,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """The static epilogue of every CPU int8 kernel: (acc [T, n] int32 + quant_bias [n], summed in
    int64 so it cannot wrap) * deq_scale [n] in float32, cast to out_dtype."""
    acc = acc.to(torch.int64)                                               # [T, n]
    if quant_bias is not None:
        acc = torch.add(acc, quant_bias)                    # int64 (type promotion, no copy of the bias)
    # int64 * float32 computes in float32: each sum rounded to float32 once, then the product
    return torch.mul(acc, deq_scale.to(torch.float32)).to(out_dtype)


def dynamic_quant_per_token_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token quantization: scale = rowmax|x| / 127, q = round(x / scale).

    x: [T, k] -> (q [T, k] int8, scale [T] float32). An all-zero row gets scale 0 and q 0.
    """
    xf = x.to(torch.float32)
    scale = xf.abs().amax(dim=-1) / INT8_MAX                                 # [T]
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(xf / safe[:, None]).clamp_(INT8_MIN, INT8_MAX).to(torch.int8)
    return q, scale


def dynamic_quant_matmul_reference(q_x: torch.Tensor, weight: torch.Tensor,
                                   weight_scale: torch.Tensor, pertoken_scale: torch.Tensor,
                                   bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """W8A8_DYNAMIC: (q_x @ weight.T) * weight_scale[n] * pertoken_scale[t] (+ bias), in float32.

    q_x [T, k] int8, weight [n, k] int8, weight_scale [n], pertoken_scale [T], bias [n].
    """
    return dequant_dynamic(int8_matmul_reference(q_x, weight), weight_scale, pertoken_scale, bias, out_dtype)


def dequant_dynamic(acc: torch.Tensor, weight_scale: torch.Tensor, pertoken_scale: torch.Tensor,
                    bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """The per-token epilogue of every CPU int8 kernel: acc [T, n] int32 * weight_scale [n] *
    pertoken_scale [T] (+ bias [n]) in float32, cast to out_dtype."""
    # int32 * float32 computes in float32 (acc rounded to float32 once), as acc.to(float32) * ...
    out = torch.mul(acc, weight_scale.to(torch.float32)[None, :]) * pertoken_scale.to(torch.float32)[:, None]
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(out_dtype)


def weight_only_matmul_reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                                 offset: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """W8A16: x @ ((weight - offset) * scale).T + bias, the antiquant done in x's dtype.

    x [T, k], weight [n, k] int8, scale / offset [n] (per output channel).
    """
    w = (weight.to(x.dtype) - offset.to(x.dtype)[:, None]) * scale.to(x.dtype)[:, None]  # [n, k]
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def quant_matmul(q_x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 out_dtype: torch.dtype, pertoken_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The `quant_matmul` op, npu_quant_matmul's contract: static (int32 `bias` = quant_bias added
    to the accumulator, `scale` = deq_scale) or, with `pertoken_scale`, dynamic (float `bias`)."""
    if pertoken_scale is None:
        return quant_matmul_reference(q_x, weight, scale, bias, out_dtype)
    return dynamic_quant_matmul_reference(q_x, weight, scale, pertoken_scale, bias, out_dtype)


def _supports_int8(**traits: Any) -> str | None:
    return None


def register(registry: OpRegistry) -> None:
    """Register the int8 reference kernels on the CPU backend. The float64 matmul is exact but no
    int8 arithmetic: it is registered as the reference (audit path "reference", which strict mode
    reports); the quantize ops are plain float32 element-wise torch, as a native kernel would be."""
    registry.register(Kernel("quantize_per_tensor", "cpu", "cpu.quantize_per_tensor",
                             quantize_per_tensor_reference, _supports_int8))
    registry.register(Kernel("dynamic_quant_per_token", "cpu", "cpu.dynamic_quant_per_token",
                             dynamic_quant_per_token_reference, _supports_int8))
    registry.register(Kernel("quant_matmul", "cpu", "cpu.quant_matmul", quant_matmul, _supports_int8,
                             priority=REFERENCE_PRIORITY))
