"""Group-wise weight-only int4 / int8 GEMM and GEMV (compressed-tensors W4A16 / W8A16).

y[m, n] = sum_k x[m, k] * (q[n, k] - zero[n, k // g]) * scale[n, k // g] + bias[n], accumulated in
fp32, as `ops/cpu_quant.weight_only_group_matmul`. `prepare_weight_only_group` lays the layer out
once:
- codes: int8 [n, k] (bits 8), or two int4 per byte along k, uint8 [n, ceil(k/2)] with the even k
  in the low nibble (`numerics/primitives.pack_int4`, the per-channel kernel's layout);
- `triton_group_scale` float32 [G, n] and `triton_group_zero` int32 [G, n] or None, transposed
  so that one K tile reads one contiguous row of each.
Every K tile lies inside one group (BLOCK_K divides g, or the row is one group), so a tile's dot
product runs on the integer codes minus the zero point (exact in fp16 / bf16 / fp32: |q - z| <= 255)
and the group's scale multiplies the [BLOCK_M, BLOCK_N] partial sum once. Group sizes that are
not a multiple of 32 (with more than one group) are rejected by `supports_weight_only_group`, and
the registry steps aside to the plain-torch reference.

Launch shapes as `weight_only.py`: decode (M <= 16) splits K over programs that add their fp32
partial sums atomically (each split applies its own groups' scales: the sum is linear); prefill
tiles the output without a split.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import triton
import triton.language as tl

from ascend_llm.numerics import primitives as P
from ascend_llm.numerics.group_quant import num_groups

GEMV_MAX_M = 16
GROUP_MULTIPLE = 32                   # smallest K tile: int4 tiles hold BLOCK_K // 2 >= 16 bytes
ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _group_kernel(x_ptr, w_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr, M, N, K, GROUP, k_per_split,
                  stride_xm, stride_wn, stride_om,
                  INT4: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                  ATOMIC: tl.constexpr, IEEE_FP32: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = rm < M, rn < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        group = k0 // GROUP                                                      # the tile's group
        scale = tl.load(scale_ptr + group * N + rn, mask=n_mask, other=0.0)       # [BN] fp32
        if INT4:
            kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)                             # byte index
            even = 2 * kb
            x_lo = tl.load(x_ptr + rm[:, None] * stride_xm + even[None, :],
                           mask=m_mask[:, None] & (even[None, :] < k_end), other=0.0)      # [BM, BK/2]
            x_hi = tl.load(x_ptr + rm[:, None] * stride_xm + even[None, :] + 1,
                           mask=m_mask[:, None] & (even[None, :] + 1 < k_end), other=0.0)
            packed = tl.load(w_ptr + rn[None, :] * stride_wn + kb[:, None],
                             mask=n_mask[None, :] & (even[:, None] < k_end), other=0)     # [BK/2, BN] int8
            low = ((packed << 4) >> 4).to(tl.int32)                                 # even-k codes
            high = (packed >> 4).to(tl.int32)                                       # odd-k codes
            if HAS_ZERO:
                zero = tl.load(zero_ptr + group * N + rn, mask=n_mask, other=0)     # [BN] int32
                low -= zero[None, :]
                high -= zero[None, :]
            if IEEE_FP32:
                part = tl.dot(x_lo, low.to(x_lo.dtype), input_precision="ieee")
                part += tl.dot(x_hi, high.to(x_hi.dtype), input_precision="ieee")
            else:
                part = tl.dot(x_lo, low.to(x_lo.dtype))
                part += tl.dot(x_hi, high.to(x_hi.dtype))
        else:
            kk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :],
                        mask=m_mask[:, None] & (kk[None, :] < k_end), other=0.0)            # [BM, BK]
            q = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None],
                        mask=n_mask[None, :] & (kk[:, None] < k_end), other=0).to(tl.int32)   # [BK, BN]
            if HAS_ZERO:
                q -= tl.load(zero_ptr + group * N + rn, mask=n_mask, other=0)[None, :]
            if IEEE_FP32:
                part = tl.dot(x, q.to(x.dtype), input_precision="ieee")
            else:
                part = tl.dot(x, q.to(x.dtype))
        acc += part * scale[None, :]
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptrs, acc, mask=mask)
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _block_k(group_size: int, k: int, gemv: bool) -> int:
    """The K tile: the largest of 128 / 64 / 32 dividing the group size (any when one group)."""
    if group_size >= k:
        return 128 if gemv else 64
    for block in (128, 64, 32):
        if group_size % block == 0:
            return block
    raise ValueError(f"group_size {group_size}: not a multiple of {GROUP_MULTIPLE} (supports_weight_only_group)")


def _num_splits(m: int, n: int, k: int, block_n: int, block_k: int, device: torch.device) -> int:
    """Split-K of a decode launch: ~4 waves of programs over the SMs, at least one K tile each."""
    if m > GEMV_MAX_M:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(triton.cdiv(k, block_k), 4 * sms // max(triton.cdiv(n, block_n), 1)))


def weight_only_group_gemm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                           zero: torch.Tensor | None, k: int, bits: int, group_size: int,
                           bias: torch.Tensor | None = None, *, split_k: int | None = None) -> torch.Tensor:
    """x [M, k] float x codes ([n, k] int8 or [n, ceil(k/2)] packed int4) with scale / zero
    [G, n] -> [M, n] in x's dtype. `split_k` overrides the decode split."""
    m, n = x.shape[0], weight.shape[0]
    gemv = m <= GEMV_MAX_M
    block_m, block_n = (16, 64) if gemv else (64 if m <= 64 else 128, 128)
    block_k = _block_k(group_size, k, gemv)
    if split_k is None:
        split_k = _num_splits(m, n, k, block_n, block_k, x.device)
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    atomic = split_k > 1
    out = torch.zeros(m, n, dtype=torch.float32, device=x.device) if atomic else \
        torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m and n:
        w = weight.view(torch.int8) if bits == 4 else weight
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split_k)
        _group_kernel[grid](
            x, w, scale, zero if zero is not None else scale, bias if bias is not None else scale, out,
            m, n, k, min(group_size, k), k_per_split, x.stride(0), w.stride(0), out.stride(0),
            INT4=bits == 4, HAS_ZERO=zero is not None, HAS_BIAS=bias is not None, ATOMIC=atomic,
            IEEE_FP32=x.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=4 if gemv else 8, num_stages=4 if gemv else 3)
    return out.to(x.dtype) if atomic else out


def supports_weight_only_group(bits: int | None = None, dtype: torch.dtype | None = None,
                               group_size: int | None = None, k: int | None = None, **_: Any) -> str | None:
    """int4 / int8 codes, float activations, and K tiles that never straddle a group."""
    if bits not in (4, 8):
        return f"bits={bits} (Triton group kernel supports 4 and 8)"
    if dtype not in ACT_DTYPES:
        return f"dtype={dtype} (float16, bfloat16 or float32 activations)"
    if group_size is None or k is None:
        return "needs the group_size and k traits"
    if group_size < k and group_size % GROUP_MULTIPLE:
        return f"group_size={group_size} (the Triton kernel needs a multiple of {GROUP_MULTIPLE}, or one group per row)"
    return None


def prepare_weight_only_group(layer: nn.Module) -> None:
    """Pack int4 codes two per byte along k; transpose scales / zero points to [G, n]."""
    codes = layer.weight.data                                                    # [n, k] int8
    k = layer.in_features_k
    if codes.shape[1] != k or layer.weight_scale.shape[1] != num_groups(k, layer.group_size):
        raise ValueError(f"{getattr(layer, 'prefix', 'layer')}: group kernel needs codes [n, {k}] and "
                         f"scales [n, {num_groups(k, layer.group_size)}], got {tuple(codes.shape)} and "
                         f"{tuple(layer.weight_scale.shape)}")
    packed = P.pack_int4(codes) if layer.quant_bits == 4 else codes.contiguous()
    layer.weight = nn.Parameter(packed, requires_grad=False)
    layer.triton_group_scale = layer.weight_scale.data.t().contiguous().float()          # [G, n]
    zero = layer.weight_zero_point
    layer.triton_group_zero = None if zero is None else zero.data.t().contiguous().to(torch.int32)  # [G, n]


def weight_only_group_matmul(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The `weight_only_group_matmul` op (`run(layer, x, bias)`): x [..., k] -> [..., n] in x's dtype."""
    k = layer.in_features_k
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    y = weight_only_group_gemm(x2, layer.weight, layer.triton_group_scale, layer.triton_group_zero, k,
                               layer.quant_bits, layer.group_size, bias)
    return y.view(*x.shape[:-1], y.shape[-1])
