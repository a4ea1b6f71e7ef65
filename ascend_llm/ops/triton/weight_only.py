"""Weight-only int8 / int4 GEMM and GEMV (FastDeploy wint8 / wint4 semantics).

y[m, n] = (sum_k x[m, k] * q[n, k]) * scale[n] + bias[n], accumulated in fp32, as
`ops/cpu_quant.weight_only_matmul`. Weights stay in the layout the quant method stores:
int8 [n, k], or int4 packed two per byte along k, uint8 [n, ceil(k/2)] (low nibble = even k,
two's complement, `numerics/primitives.pack_int4`). The kernel never re-interleaves the nibbles:
it multiplies the even-k activations by the low nibbles and the odd-k ones by the high nibbles
(two dots per tile), so `prepare` only checks and fixes contiguity.

Two launch shapes of one kernel:
- GEMV (decode, M <= 16): one 16-row tile, a narrow column tile, and split-K so that enough
  programs stream the weight to reach memory bandwidth; partial sums are atomically added
  to an fp32 buffer (the scale is linear, so each split applies it).
- GEMM (prefill): classic output tiles, no split.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import triton
import triton.language as tl

GEMV_MAX_M = 16


@triton.jit
def _weight_only_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, M, N, K, k_per_split,
                        stride_xm, stride_wn, stride_om,
                        INT4: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
                        IEEE_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = rm < M, rn < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if INT4:
        # tile = BLOCK_K activations = BLOCK_K // 2 packed bytes per weight row
        rb = tl.arange(0, BLOCK_K // 2)
        for k0 in range(k_start, k_end, BLOCK_K):
            kb = k0 // 2 + rb                                                     # byte index
            even = 2 * kb
            x_even = tl.load(x_ptr + rm[:, None] * stride_xm + even[None, :],
                             mask=m_mask[:, None] & (even[None, :] < k_end), other=0.0)
            x_odd = tl.load(x_ptr + rm[:, None] * stride_xm + even[None, :] + 1,
                            mask=m_mask[:, None] & (even[None, :] + 1 < k_end), other=0.0)
            packed = tl.load(w_ptr + rn[None, :] * stride_wn + kb[:, None],
                             mask=n_mask[None, :] & (even[:, None] < k_end), other=0)   # [BK/2, BN] int8
            low = ((packed << 4) >> 4).to(x_even.dtype)                           # even-k codes
            high = (packed >> 4).to(x_even.dtype)                                 # odd-k codes
            if IEEE_FP32:
                acc += tl.dot(x_even, low, input_precision="ieee")
                acc += tl.dot(x_odd, high, input_precision="ieee")
            else:
                acc += tl.dot(x_even, low)
                acc += tl.dot(x_odd, high)
    else:
        rk = tl.arange(0, BLOCK_K)
        for k0 in range(k_start, k_end, BLOCK_K):
            kk = k0 + rk
            x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :],
                        mask=m_mask[:, None] & (kk[None, :] < k_end), other=0.0)       # [BM, BK]
            q = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None],
                        mask=n_mask[None, :] & (kk[:, None] < k_end), other=0)         # [BK, BN]
            if IEEE_FP32:
                acc += tl.dot(x, q.to(x.dtype), input_precision="ieee")
            else:
                acc += tl.dot(x, q.to(x.dtype))
    acc = acc * tl.load(scale_ptr + rn, mask=n_mask, other=0.0)[None, :]
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptrs, acc, mask=mask)
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4                                  # interpreter: a few splits exercise the atomic path


def weight_only_gemm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, k: int, bits: int,
                     bias: torch.Tensor | None = None, *, split_k: int | None = None) -> torch.Tensor:
    """x [M, k] float x weight ([n, k] int8 or [n, ceil(k/2)] packed int4) * scale [n] -> [M, n].

    `split_k` overrides the GEMV split (M <= 16); GEMM launches (M > 16) never split.
    """
    m, n = x.shape[0], weight.shape[0]
    int4 = bits == 4
    out_dtype = x.dtype
    gemv = m <= GEMV_MAX_M
    if gemv:
        block_m, block_n, block_k = 16, 64, 256 if int4 else 128
        tiles = triton.cdiv(n, block_n)
        if split_k is None:   # ~4 waves of programs over the SMs, at least one K tile each
            split_k = max(1, min(triton.cdiv(k, block_k), 4 * _num_sms(x.device) // max(tiles, 1)))
    else:
        block_m = 64 if m <= 64 else 128
        block_n, block_k = 128, 128 if int4 else 64
        split_k = 1
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    atomic = split_k > 1
    out = torch.zeros(m, n, dtype=torch.float32, device=x.device) if atomic else \
        torch.empty(m, n, dtype=out_dtype, device=x.device)
    if m and n:
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split_k)
        w = weight.view(torch.int8) if int4 else weight
        _weight_only_kernel[grid](
            x, w, scale, bias if bias is not None else scale, out, m, n, k, k_per_split,
            x.stride(0), w.stride(0), out.stride(0), INT4=int4, HAS_BIAS=bias is not None,
            ATOMIC=atomic, IEEE_FP32=x.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_K=block_k, num_warps=4 if gemv else 8, num_stages=4 if gemv else 3)
    return out.to(out_dtype) if atomic else out


def prepare_weight_only(layer: nn.Module) -> None:
    """Check the layout the kernel reads and make the tensors contiguous (int4 stays packed)."""
    bits, k = layer.quant_bits, layer.in_features_k
    expected = (torch.int8, k) if bits == 8 else (torch.uint8, (k + 1) // 2)
    w = layer.weight
    if w.dtype != expected[0] or w.dim() != 2 or w.shape[1] != expected[1]:
        raise ValueError(f"{getattr(layer, 'prefix', 'layer')}.weight: wint{bits} kernel needs "
                         f"{expected[0]} [n, {expected[1]}], got {w.dtype} {tuple(w.shape)}")
    layer.weight.data = w.data.contiguous()
    layer.weight_scale.data = layer.weight_scale.data.to(torch.float32).reshape(-1).contiguous()


def weight_only_matmul(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The `weight_only_matmul` op (`run(layer, x, bias)`): x [..., k] -> [..., n] in x's dtype."""
    k = layer.in_features_k
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    y = weight_only_gemm(x2, layer.weight, layer.weight_scale, k, layer.quant_bits, bias)
    return y.view(*x.shape[:-1], y.shape[-1])
