"""NPU kernels of the quantized linear layers, calling torch_npu as vllm-ascend does.

`prepare(layer)` runs once after loading: the int8 weight [n, k] is transposed to [k, n] and cast
to FRACTAL_NZ (`npu_format_cast(w, 29)`), scales are re-expressed in the dtypes the ops take, and
the layer's `weight` is replaced by the NPU layout. `run(layer, x, bias)` then makes the
torch_npu calls:
- W8A8 static: npu_quantize(x, 1/input_scale repeated to k, input_offset repeated to k, qint8,
  -1, div_mode=False), then npu_quant_matmul(q, w, deq_scale, bias=quant_bias on TP rank 0,
  output_dtype) with deq_scale int64 (float32 bits) for float16 and float32 for bfloat16;
- W8A8 dynamic: npu_dynamic_quant(x) -> (q, per-token scale), then npu_quant_matmul(q, w,
  weight_scale, pertoken_scale=..., bias=bias);
- W8A16 and wint8 / wint4: npu_weight_quant_batchmatmul(x, w, antiquant_scale, antiquant_offset,
  bias=...), int4 packed by npu_convert_weight_to_int4pack;
- group-wise W4A16 / W8A16 (compressed-tensors): the same op with antiquant_scale / offset
  [ceil(k / g), n] and antiquant_group_size=g (vllm-ascend's AscendwNa16LinearKernel,
  vllm_ascend/quantization/kernels/mixed_precision/npu.py, makes the same call).
310P (Atlas inference series) restrictions are reported by `supports` with the reason.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ascend_llm.numerics import primitives as P
from ascend_llm.ops.npu_runtime import deq_scale_int64, is_310p, to_nz, torch_npu

NPU_ACT_DTYPES = (torch.float16, torch.bfloat16)


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def _flatten(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])                                          # [T, k]


def _unflatten(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _bias_for_weight_quant(bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    # npu_weight_quant_batchmatmul: float16 bias with float16 x, float32 bias with bfloat16 x
    if bias is None:
        return None
    return bias.to(torch.float32 if dtype == torch.bfloat16 else torch.float16)


# ------------------------------------------------------------------------- activation quantization

def quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Static asymmetric int8: round(x * (1 / scale) + offset), x [T, k]; scale/offset 0-dim."""
    k = x.shape[-1]
    reciprocal = torch.reciprocal(scale.float()).to(x.dtype).reshape(1).repeat(k)   # [k]
    zero_point = offset.to(x.dtype).reshape(1).repeat(k)                             # [k]
    return torch_npu().npu_quantize(x, reciprocal, zero_point, torch.qint8, -1, False)


def dynamic_quant_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token int8: (q [T, k] int8, scale [T] float32)."""
    return torch_npu().npu_dynamic_quant(x)


# ------------------------------------------------------------------------------- W8A8 static

def prepare_w8a8_static(layer: nn.Module) -> None:
    """Re-layout a W8A8StaticLinearMethod layer for npu_quantize + npu_quant_matmul."""
    if len(layer.w8a8_groups) != 1:
        raise ValueError(f"{layer.prefix}: fused shards with different input_scale/input_offset "
                         f"({len(layer.w8a8_groups)} groups) are not supported on the NPU; "
                         f"msModelSlim writes one activation scale per fused layer")
    dtype = layer.params_dtype
    k = layer.weight.shape[1]
    layer.npu_input_scale_reciprocal = torch.reciprocal(layer.input_scale[0].float()).to(dtype).repeat(k)  # [k]
    layer.npu_input_offset = layer.input_offset[0].to(dtype).repeat(k)                                     # [k]
    deq = layer.deq_scale_fp32
    layer.npu_deq_scale = deq_scale_int64(deq) if dtype == torch.float16 else deq.float()                 # [n]
    layer.npu_quant_bias = layer.quant_bias.data if layer.w8a8_add_quant_bias else None                    # [n] int32
    layer.weight = _frozen(to_nz(layer.weight.data.t()))                                                   # [k, n] NZ


def run_w8a8_static(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The float bias is folded into quant_bias by msModelSlim, so `bias` is not added."""
    npu = torch_npu()
    x2 = _flatten(x)
    q = npu.npu_quantize(x2, layer.npu_input_scale_reciprocal, layer.npu_input_offset,
                         torch.qint8, -1, False)                                    # [T, k] int8
    y = npu.npu_quant_matmul(q, layer.weight, layer.npu_deq_scale, bias=layer.npu_quant_bias,
                             output_dtype=x.dtype)                                  # [T, n]
    return _unflatten(y, x)


# ------------------------------------------------------------------------------ W8A8 dynamic

def prepare_w8a8_dynamic(layer: nn.Module) -> None:
    """Re-layout a W8A8DynamicLinearMethod layer for npu_dynamic_quant + npu_quant_matmul."""
    layer.npu_weight_scale = layer.weight_scale_fp32.float()                       # [n] float32
    layer.weight = _frozen(to_nz(layer.weight.data.t()))                           # [k, n] NZ


def run_w8a8_dynamic(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    npu = torch_npu()
    x2 = _flatten(x)
    q, token_scale = npu.npu_dynamic_quant(x2)                                      # [T, k], [T]
    y = npu.npu_quant_matmul(q, layer.weight, layer.npu_weight_scale, pertoken_scale=token_scale,
                             bias=None if bias is None else bias.to(x.dtype), output_dtype=x.dtype)
    return _unflatten(y, x)


# ---------------------------------------------------------------- weight-only (W8A16, wint8, wint4)

def prepare_w8a16(layer: nn.Module) -> None:
    """msModelSlim W8A16: (W - weight_offset) * weight_scale = (W + antiquant_offset) * antiquant_scale."""
    dtype = layer.params_dtype
    layer.npu_antiquant_scale = layer.weight_scale_fp32.to(dtype)                  # [n]
    layer.npu_antiquant_offset = (-layer.weight_offset_fp32).to(dtype)             # [n]
    layer.weight = _frozen(to_nz(layer.weight.data.t()))                           # [k, n] NZ


def prepare_weight_only(layer: nn.Module) -> None:
    """wint8: [k, n] int8 NZ; wint4: unpacked, transposed and re-packed by npu_convert_weight_to_int4pack."""
    dtype = layer.params_dtype
    layer.npu_antiquant_scale = layer.weight_scale.data.to(dtype)                  # [n]
    layer.npu_antiquant_offset = None
    if layer.quant_bits == 8:
        layer.weight = _frozen(to_nz(layer.weight.data.t()))                       # [k, n] NZ
        return
    q = P.unpack_int4(layer.weight.data, layer.in_features_k)                      # [n, k] int8
    if q.shape[0] % 8:
        raise ValueError(f"{getattr(layer, 'prefix', 'layer')}: wint4 on the NPU needs the output "
                         f"size to be a multiple of 8 (npu_convert_weight_to_int4pack), got {q.shape[0]}")
    packed = torch_npu().npu_convert_weight_to_int4pack(q.t().contiguous().to(torch.int32))
    layer.weight = _frozen(packed)                                                 # [k, n / 8] int32


def run_weight_quant(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = torch_npu().npu_weight_quant_batchmatmul(
        _flatten(x), layer.weight, layer.npu_antiquant_scale, layer.npu_antiquant_offset,
        bias=_bias_for_weight_quant(bias, x.dtype))
    return _unflatten(y, x)


# ------------------------------------------------------ group-wise weight-only (W4A16 / W8A16)

def prepare_weight_only_group(layer: nn.Module) -> None:
    """Codes int8 [n, k] -> weight [k, n] int8 (ND), or int4 re-packed by
    npu_convert_weight_to_int4pack to int32 [k, n / 8]; scale [n, G] -> antiquant_scale [G, n] in
    the activation dtype; zero points [n, G] -> antiquant_offset = -zero [G, n] (the op computes
    (w + antiquant_offset) * antiquant_scale, the format (w - zero) * scale). One group (g >= k)
    is the per-channel form: scale / offset [n], antiquant_group_size 0."""
    dtype, (n, _) = layer.act_dtype, layer.weight.shape
    groups = layer.weight_scale.shape[1]
    scale = layer.weight_scale.data.t().contiguous().to(dtype)                       # [G, n]
    zero = layer.weight_zero_point
    offset = None if zero is None else (-zero.data.float()).t().contiguous().to(dtype)   # [G, n]
    if groups == 1:
        scale, offset = scale.reshape(n), None if offset is None else offset.reshape(n)   # [n]
    layer.npu_antiquant_scale, layer.npu_antiquant_offset = scale, offset
    layer.npu_antiquant_group_size = 0 if groups == 1 else layer.group_size
    codes = layer.weight.data.t().contiguous()                                        # [k, n] int8
    if layer.quant_bits == 4:
        codes = torch_npu().npu_convert_weight_to_int4pack(codes.to(torch.int32))     # [k, n / 8] int32
    layer.weight = _frozen(codes)


def run_weight_only_group(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = torch_npu().npu_weight_quant_batchmatmul(
        _flatten(x), layer.weight, layer.npu_antiquant_scale, layer.npu_antiquant_offset,
        bias=_bias_for_weight_quant(bias, x.dtype), antiquant_group_size=layer.npu_antiquant_group_size)
    return _unflatten(y, x)


# ---------------------------------------------------------------------------------- supports

def supports_w8a8(scheme: str) -> Any:
    """`supports` of the whole-layer W8A8 kernel for `scheme` (static | dynamic | w8a16)."""
    def supports(scheme: str | None = None, dtype: torch.dtype | None = None, **_: Any) -> str | None:
        if scheme != wanted:
            return f"scheme={scheme!r} (this kernel: {wanted!r})"
        if dtype not in NPU_ACT_DTYPES:
            return f"dtype={dtype} (torch_npu quant matmuls take float16/bfloat16 activations)"
        return _soc_reason(scheme, dtype)
    wanted = scheme
    return supports


def supports_weight_only(bits: int | None = None, dtype: torch.dtype | None = None,
                         **_: Any) -> str | None:
    if bits not in (4, 8):
        return f"bits={bits} (npu_weight_quant_batchmatmul: 4 and 8)"
    if dtype not in NPU_ACT_DTYPES:
        return f"dtype={dtype} (npu_weight_quant_batchmatmul takes float16/bfloat16 activations)"
    return _soc_reason("w4a16" if bits == 4 else "w8a16", dtype)


def supports_weight_only_group(bits: int | None = None, dtype: torch.dtype | None = None,
                               group_size: int | None = None, k: int | None = None, n: int | None = None,
                               **_: Any) -> str | None:
    """npu_weight_quant_batchmatmul's documented limits: per-group needs antiquant_group_size a
    multiple of 32 in [32, k - 1] and an Atlas A2 / A3 (310P: per-channel int8 only); int4 goes
    through npu_convert_weight_to_int4pack, which packs n in eights."""
    reason = supports_weight_only(bits=bits, dtype=dtype)
    if reason is not None:
        return reason
    if group_size is None or k is None or n is None:
        return "needs the group_size, k and n traits"
    if group_size < k:
        if is_310p():
            return "310P (Atlas inference series): npu_weight_quant_batchmatmul has no per-group antiquant"
        if group_size % 32:
            return f"group_size={group_size} (antiquant_group_size must be a multiple of 32 in [32, k - 1])"
    if bits == 4:
        if is_310p():
            return "310P (Atlas inference series): npu_weight_quant_batchmatmul takes int8 weights only"
        if n % 8:
            return f"n={n} (npu_convert_weight_to_int4pack packs the output dim in eights)"
    return None


def _soc_reason(scheme: str, dtype: torch.dtype) -> str | None:
    if not is_310p():
        return None
    if scheme == "dynamic":
        return "310P (Atlas inference series): npu_quant_matmul has no pertoken_scale (W8A8_DYNAMIC)"
    if dtype == torch.bfloat16:
        return "310P (Atlas inference series) has no bfloat16 quant matmuls; use float16"
    return None
