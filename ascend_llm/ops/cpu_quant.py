"""CPU kernels of the quantized ops: references (dequantize, then matmul in fp32) and faster
variants of the same math, selected first (priority 1) and tested against the references.

Every kernel has the `linear` signature run(layer, x, bias) with x: [num_tokens, k] and returns
[num_tokens, n] in x's dtype. They read the tensors a quant method left on the layer:
- weight_only_matmul: layer.weight int8 [n, k] (bits 8) or uint8 [n, ceil(k/2)] (bits 4, see
  numerics/primitives.pack_int4), layer.weight_scale float32 [n], layer.quant_bits, layer.in_features_k;
- fp8_matmul, scheme "per_tensor": layer.weight e4m3 [n, k], layer.weight_scale float32 0-dim;
  activations quantized dynamically per tensor;
- fp8_matmul, scheme "block": layer.weight e4m3 [n, k], layer.weight_scale_inv float32 [NB, KB],
  layer.weight_block_size (bn, bk); activations quantized dynamically per token per bk channels.
- fp8_matmul, scheme "per_tensor_static": as "per_tensor", but activations use the fixed
  layer.input_scale float32 0-dim (AutoFP8 `activation_scheme: static`);
- fp8_matmul, scheme "per_token" (row-wise: msModelSlim WFP8AFP8_DYNAMIC, compressed-tensors
  FP8_DYNAMIC): layer.weight e4m3 [n, k], layer.weight_scale float32 [n] or [n, 1]; activations
  quantized dynamically per token;
- weight_only_matmul, bits 2: FastDeploy WINT2 tensors layer.quant_weight uint8 [k/4, n],
  layer.weight_scale uint8 [ceil(k/128), n], layer.super_scales [n], layer.code_scale /
  layer.code_zp float32 [n] (decode rule: numerics/wint2.py).
- weight_only_group_matmul (int4 / int8 codes with group scales, compressed-tensors W4A16 /
  W8A16): layer.weight int8 [n, k] codes, layer.weight_scale float32 [n, G],
  layer.weight_zero_point int8 [n, G] or None (symmetric), layer.group_size g (G = ceil(k / g)),
  layer.quant_bits; W = (code - zero) * scale per group (numerics/group_quant.py).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ascend_llm.numerics import primitives as P
from ascend_llm.numerics.group_quant import dequantize_groups
from ascend_llm.numerics.wint2 import dequantize_wint2
from ascend_llm.ops.registry import Kernel, OpRegistry

BACKEND = "cpu"


def _finish(y: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)


def weight_only_matmul(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ (q * scale).T + bias, computed as (x @ q.T) * scale in fp32 (same math, the scale
    applied on the [m, n] output instead of the [n, k] weight)."""
    q = layer.weight
    if layer.quant_bits == 4:
        q = P.unpack_int4(q, layer.in_features_k)                 # [n, k] int8
    y = F.linear(x.float(), q.float()) * layer.weight_scale.float()   # [m, n]
    return _finish(y, bias, x.dtype)


def fp8_matmul_per_tensor(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Dynamic per-tensor e4m3 activations x e4m3 per-tensor weights: (xq @ wq.T) * (sx * sw)."""
    xq, sx = P.quantize_fp8_per_tensor(x, min_scale=P.FP8_MIN_SCALE)   # [m, k] e4m3, 0-dim
    y = F.linear(xq.float(), layer.weight.float()) * (sx * layer.weight_scale.float())
    return _finish(y, bias, x.dtype)


def fp8_per_token_matmul_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                                   bias: torch.Tensor | None) -> torch.Tensor:
    """x [T, k] float, weight [n, k] e4m3, weight_scale [n] -> [T, n] float32:
    (q_x @ W.T) * token_scale[t] * weight_scale[n] (+ bias), token_scale = max(rowmax|x| / 448,
    1 / (448 * 512)) (primitives.quantize_fp8_per_token_group). The e4m3 -> float conversion moves
    bits (exact, `fp8_to_float16_scaled` gives q / 256)."""
    q_x, token_scale = P.quantize_fp8_per_token_group(x, group_size=x.shape[1])   # [T, k], [T, 1]
    x16, w16 = P.fp8_to_float16_scaled(q_x), P.fp8_to_float16_scaled(weight)        # q / 256
    acc = F.linear(x16.float(), w16.float())                                        # [T, n]
    out = acc * (token_scale * P.FP8_FP16_RESCALE ** 2) * weight_scale.float()[None, :]
    return out if bias is None else out + bias.float()


def fp8_matmul_per_token(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Dynamic per-token e4m3 activations x per-channel e4m3 weights (`fp8_per_token_matmul_reference`)."""
    k = layer.weight.shape[1]
    out = fp8_per_token_matmul_reference(x.reshape(-1, k), layer.weight, layer.weight_scale.reshape(-1), bias)
    return out.reshape(*x.shape[:-1], out.shape[-1]).to(x.dtype)


def fp8_matmul_per_tensor_static(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Static per-tensor e4m3 activations (x / input_scale, saturated) x e4m3 per-tensor weights."""
    sx = layer.input_scale.float()                                      # 0-dim
    xq = P.fp8_cast(x.float() / sx)                                     # [m, k] e4m3
    y = F.linear(xq.float(), layer.weight.float()) * (sx * layer.weight_scale.float())
    return _finish(y, bias, x.dtype)


def weight_only_matmul_wint2(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """WINT2: decode the five FastDeploy tensors to an fp32 [n, k] weight, then x @ W.T in fp32."""
    w = dequantize_wint2(layer.quant_weight, layer.weight_scale, layer.super_scales,
                         layer.code_scale, layer.code_zp)                # [n, k] fp32
    return _finish(F.linear(x.float(), w), bias, x.dtype)


def weight_only_group_matmul(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Group-wise int4 / int8: dequantize the codes to an fp32 [n, k] weight, then x @ W.T in fp32."""
    w = dequantize_groups(layer.weight, layer.weight_scale, layer.weight_zero_point,
                          layer.group_size)                                # [n, k] fp32
    return _finish(F.linear(x.float(), w), bias, x.dtype)


def fp8_matmul_block(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Dynamic per-token-group e4m3 activations x 128x128-block e4m3 weights, dequantized to fp32."""
    bn, bk = layer.weight_block_size
    xq, sx = P.quantize_fp8_per_token_group(x, group_size=bk)           # [m, k], [m, KB]
    x_deq = P.dequantize_fp8_per_token_group(xq, sx, group_size=bk)     # [m, k] fp32
    w_deq = P.dequantize_fp8_block(layer.weight, layer.weight_scale_inv, (bn, bk))   # [n, k] fp32
    return _finish(F.linear(x_deq, w_deq), bias, x.dtype)


# ---------------------------------------------------------------- faster CPU variants (same math)
# Registered above the references (priority 1); ASCEND_LLM_DISABLE_KERNELS=<name> falls back.

def weight_only_matmul_split(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """int4 without re-interleaving the weight: y = (x_even @ low.T + x_odd @ high.T) * scale,
    low/high the nibble halves of each byte (even / odd k)."""
    low, high = P.unpack_int4_halves(layer.weight)                 # [n, ceil(k/2)] int8 each
    xf = x.float()                                                 # [m, k]
    k = layer.in_features_k
    y = F.linear(xf[:, 0::2], low.float()) + F.linear(xf[:, 1::2], high[:, :k // 2].float())
    return _finish(y * layer.weight_scale.float(), bias, x.dtype)


def fp8_matmul_per_tensor_fast(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`fp8_matmul_per_tensor` with the e4m3 -> float conversion done by bit moves (exact)."""
    xq, sx = P.quantize_fp8_per_tensor(x, min_scale=P.FP8_MIN_SCALE)
    x16, w16 = P.fp8_to_float16_scaled(xq), P.fp8_to_float16_scaled(layer.weight)   # q / 256
    scale = sx * layer.weight_scale.float() * (P.FP8_FP16_RESCALE ** 2)
    return _finish(F.linear(x16.float(), w16.float()) * scale, bias, x.dtype)


def fp8_matmul_block_fast(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Block fp8 as DeepGEMM does it: per 128-wide k block, (xq_j @ wq_j.T) scaled by the token's
    group scale [m, 1] and the weight block scales [1, n], accumulated in fp32."""
    bn, bk = layer.weight_block_size
    n, k = layer.weight.shape
    xq, sx = P.quantize_fp8_per_token_group(x, group_size=bk)            # [m, k], [m, KB]
    xf = P.fp8_to_float16_scaled(xq).float()                             # [m, k] = xq / 256
    wf = P.fp8_to_float16_scaled(layer.weight).float()                   # [n, k] = wq / 256
    sw = layer.weight_scale_inv.float().repeat_interleave(bn, 0)[:n]     # [n, KB]
    sx = sx * P.FP8_FP16_RESCALE ** 2                                    # undo both / 256
    y = x.new_zeros(x.shape[0], n, dtype=torch.float32)                  # [m, n]
    for j in range(sw.shape[1]):
        cols = slice(j * bk, min(k, (j + 1) * bk))
        y += F.linear(xf[:, cols], wf[:, cols]) * sx[:, j:j + 1] * sw[:, j]
    return _finish(y, bias, x.dtype)


def _supports_weight_only(bits: int | None = None, **traits: Any) -> str | None:
    return None if bits in (4, 8) else f"bits={bits} (supports 4 and 8)"


def _supports_int4(bits: int | None = None, **traits: Any) -> str | None:
    return None if bits == 4 else f"bits={bits} (int4 only; int8 -> float is already one fast cast)"


def _supports_int2(bits: int | None = None, **traits: Any) -> str | None:
    return None if bits == 2 else f"bits={bits} (WINT2 only)"


def _supports_scheme(scheme: str) -> Any:
    def supports(**traits: Any) -> str | None:
        got = traits.get("scheme")
        return None if got == scheme else f"scheme={got!r} (supports {scheme!r})"
    return supports


def register(registry: OpRegistry) -> None:
    """Register the quantized-op reference kernels. Each decodes the weights to float and runs a
    float matmul (`dequantizes`: strict mode and the audit report them as such)."""
    registry.register(Kernel("weight_only_matmul", BACKEND, "cpu.weight_only_matmul",
                             weight_only_matmul, _supports_weight_only, dequantizes=True))
    registry.register(Kernel("fp8_matmul", BACKEND, "cpu.fp8_matmul_per_tensor",
                             fp8_matmul_per_tensor, _supports_scheme("per_tensor"), dequantizes=True))
    registry.register(Kernel("fp8_matmul", BACKEND, "cpu.fp8_matmul_block",
                             fp8_matmul_block, _supports_scheme("block"), dequantizes=True))
    registry.register(Kernel("fp8_matmul", BACKEND, "cpu.fp8_matmul_per_tensor_static",
                             fp8_matmul_per_tensor_static, _supports_scheme("per_tensor_static"), dequantizes=True))
    registry.register(Kernel("weight_only_group_matmul", BACKEND, "cpu.weight_only_group_matmul",
                             weight_only_group_matmul, _supports_weight_only, dequantizes=True))
    registry.register(Kernel("fp8_matmul", BACKEND, "cpu.fp8_matmul_per_token",
                             fp8_matmul_per_token, _supports_scheme("per_token"), dequantizes=True))
    registry.register(Kernel("weight_only_matmul", BACKEND, "cpu.weight_only_matmul_wint2",
                             weight_only_matmul_wint2, _supports_int2, dequantizes=True))
    registry.register(Kernel("weight_only_matmul", BACKEND, "cpu.weight_only_matmul_split",
                             weight_only_matmul_split, _supports_int4, priority=1, dequantizes=True))
    registry.register(Kernel("fp8_matmul", BACKEND, "cpu.fp8_matmul_per_tensor_fast",
                             fp8_matmul_per_tensor_fast, _supports_scheme("per_tensor"), priority=1, dequantizes=True))
    registry.register(Kernel("fp8_matmul", BACKEND, "cpu.fp8_matmul_block_fast",
                             fp8_matmul_block_fast, _supports_scheme("block"), priority=1, dequantizes=True))
