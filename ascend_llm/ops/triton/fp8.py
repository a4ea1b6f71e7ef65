"""FP8 (e4m3) on CUDA: activation quantization, the scaled fp8 GEMM, and `torch._scaled_mm`.

- Activation quantization is fused into one kernel per scheme: per token per `group` channels
  (block fp8, DeepSeek / FastDeploy), or with one given per-tensor scale (dynamic per-tensor
  takes the amax with torch first; static uses `input_scale`). q = sat_e4m3(x / scale) (IEEE
  division, `tl.div_rn`), rounded
  half-to-even onto the e4m3 grid in fp32 by bit arithmetic (`_round_to_e4m3`) before the cast,
  so the bits equal torch's `.to(float8_e4m3fn)` on any device (the interpreter's own fp32 ->
  fp8 cast is not exact).
- `scaled_fp8_gemm`: y = sum over k tiles of (xq_t @ wq_t.T) * sx[m, kgroup] * sw[n // bn, kgroup],
  fp32 accumulation. Scale strides of 0 broadcast, so one kernel runs block-wise (128x128
  weight blocks, per-token-group activations), per-tensor and row-wise scales.
- Per-tensor and row-wise (per-token x per-channel) fp8 on a GPU go to `torch._scaled_mm`
  (cuBLASLt, at the fp8 tensor-core limit) when its rules hold (k and n multiples of 16; row-wise
  also a bf16 output); otherwise to `scaled_fp8_gemm`.
  `_scaled_mm` has no CPU kernel: its wrapper is checked on CPU against an emulation of its
  documented contract (tests/ops/triton/test_fp8.py), never against the real op.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import triton
import triton.language as tl

from ascend_llm.numerics import primitives as P

FP8_MAX = P.FP8_MAX


@triton.jit
def _round_to_e4m3(v):
    """fp32 in [-448, 448] -> the nearest e4m3 value (ties to even), still fp32."""
    a = tl.abs(v)
    bits = a.to(tl.int32, bitcast=True)
    lsb = (bits >> 20) & 1                                   # keep 3 of 23 mantissa bits
    normal = ((bits + 0x7FFFF + lsb) & -1048576).to(tl.float32, bitcast=True)
    subnormal = (a + 24576.0) - 24576.0                      # multiples of 2^-9 (1.5 * 2^14 trick)
    r = tl.where(a < 0.015625, subnormal, normal)            # 2^-6: smallest normal e4m3
    sign = v.to(tl.int32, bitcast=True) & -2147483648        # keeps -0.0 negative, as torch
    return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _quant_fp8_group_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, stride_sm, min_scale,
                            GROUP: tl.constexpr):
    row, g = tl.program_id(0), tl.program_id(1)
    cols = g * GROUP + tl.arange(0, GROUP)
    mask = cols < K
    x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.div_rn(tl.max(tl.abs(x), axis=0), 448.0), min_scale)
    v = tl.minimum(tl.maximum(tl.div_rn(x, scale), -448.0), 448.0)
    tl.store(q_ptr + row * stride_qm + cols, _round_to_e4m3(v).to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row * stride_sm + g, scale)


@triton.jit
def _quant_fp8_static_kernel(x_ptr, q_ptr, s_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.minimum(tl.maximum(tl.div_rn(x, tl.load(s_ptr)), -448.0), 448.0)
    tl.store(q_ptr + offs, _round_to_e4m3(v).to(q_ptr.dtype.element_ty), mask=mask)


def quantize_fp8_per_token_group(x: torch.Tensor, group_size: int = 128
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [m, k] -> (q e4m3 [m, k], scale float32 [m, ceil(k/group)]), `primitives`' semantics."""
    if group_size & (group_size - 1) or group_size < 16:
        raise ValueError(f"group_size: must be a power of two >= 16, got {group_size}")
    x = x.contiguous()
    m, k = x.shape
    groups = triton.cdiv(k, group_size)
    q = torch.empty(m, k, dtype=P.FP8_DTYPE, device=x.device)
    scale = torch.empty(m, groups, dtype=torch.float32, device=x.device)
    if m and k:
        _quant_fp8_group_kernel[(m, groups)](x, q, scale, k, x.stride(0), q.stride(0), scale.stride(0),
                                             P.FP8_MIN_SCALE, GROUP=group_size)
    return q, scale


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token (row-wise): x [m, k] -> (q e4m3 [m, k], scale float32 [m, 1]); one group
    spanning the row (its power-of-two tile masked to the k real channels)."""
    return quantize_fp8_per_token_group(x, max(16, triton.next_power_of_2(x.shape[1])))


def quantize_fp8_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x any shape, scale float32 (one value) -> sat_e4m3(x / scale), same shape."""
    x = x.contiguous()
    q = torch.empty(x.shape, dtype=P.FP8_DTYPE, device=x.device)
    block = 1024
    if x.numel():
        _quant_fp8_static_kernel[(triton.cdiv(x.numel(), block),)](
            x, q, scale.reshape(1).to(torch.float32), x.numel(), BLOCK=block)
    return q


def quantize_fp8_per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-tensor: scale = max(amax / 448, 1 / (448 * 512)) -> (q e4m3, scale 0-dim)."""
    amax = x.abs().amax().float() if x.numel() else torch.zeros((), device=x.device)
    scale = (amax / FP8_MAX).clamp_min(P.FP8_MIN_SCALE)
    return quantize_fp8_static(x, scale), scale


@triton.jit
def _scaled_fp8_gemm_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, c_ptr, M, N, K,
                            stride_am, stride_bn, stride_cm,
                            stride_sam, stride_sak, stride_sbn, stride_sbk, group_n, group_k,
                            HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask, n_mask = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :],
                    mask=m_mask[:, None] & (kk[None, :] < K), other=0.0)       # [BM, BK] e4m3
        b = tl.load(b_ptr + rn[None, :] * stride_bn + kk[:, None],
                    mask=n_mask[None, :] & (kk[:, None] < K), other=0.0)       # [BK, BN] e4m3
        kg = k0 // group_k
        sa = tl.load(sa_ptr + rm * stride_sam + kg * stride_sak, mask=m_mask, other=0.0)
        sb = tl.load(sb_ptr + (rn // group_n) * stride_sbn + kg * stride_sbk, mask=n_mask, other=0.0)
        acc += tl.dot(a, b) * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


def scaled_fp8_gemm(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                    block_size: tuple[int, int] | None, bias: torch.Tensor | None,
                    out_dtype: torch.dtype) -> torch.Tensor:
    """xq [m, k] e4m3, wq [n, k] e4m3 -> [m, n] out_dtype.

    block_size (bn, bk): x_scale [m, ceil(k/bk)], w_scale [ceil(n/bn), ceil(k/bk)] (bk a power of
    two >= 32: it is the k tile). None: x_scale one value (per tensor) or m (per token), w_scale
    one value or n (per output channel).
    """
    m, k = xq.shape
    n = wq.shape[0]
    out = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    if m == 0 or n == 0:
        return out
    if block_size is None:
        x_scale, w_scale = x_scale.reshape(-1).float(), w_scale.reshape(-1).float()
        if x_scale.numel() not in (1, m) or w_scale.numel() not in (1, n):
            raise ValueError(f"scaled_fp8_gemm: x_scale has {x_scale.numel()} values (1 or m={m}), "
                             f"w_scale {w_scale.numel()} (1 or n={n})")
        bn, bk, block_k = 1, k, 64
        s_strides = (int(x_scale.numel() > 1), 0, int(w_scale.numel() > 1), 0)
    else:
        bn, bk = block_size
        block_k = bk
        s_strides = (x_scale.stride(0), x_scale.stride(1), w_scale.stride(0), w_scale.stride(1))
    block_m = 16 if m <= 16 else 64 if m <= 64 else 128
    block_n = 64 if m <= 16 else 128
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _scaled_fp8_gemm_kernel[grid](xq, wq, x_scale, w_scale, bias if bias is not None else x_scale, out,
                                  m, n, k, xq.stride(0), wq.stride(0), out.stride(0), *s_strides,
                                  bn, bk, HAS_BIAS=bias is not None, BLOCK_M=block_m,
                                  BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4 if m <= 16 else 8,
                                  num_stages=3)
    return out


# ---------------------------------------------------------------- fp8_matmul kernels (run(layer, x, bias))

def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    return x.reshape(-1, k).contiguous()


def prepare_block(layer: nn.Module) -> None:
    """Block fp8: the weight stays [n, k] e4m3 row-major; scales fp32 contiguous."""
    bn, bk = layer.weight_block_size
    if bk & (bk - 1) or bk < 32:
        raise ValueError(f"{getattr(layer, 'prefix', 'layer')}: weight_block_size k={bk} must be a "
                         f"power of two >= 32 for the Triton block-fp8 kernel (it is the k tile)")
    layer.weight.data = layer.weight.data.contiguous()
    layer.weight_scale_inv.data = layer.weight_scale_inv.data.float().contiguous()


def fp8_matmul_block(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Dynamic per-token-group e4m3 activations x (bn, bk)-block e4m3 weights (one fused quant
    kernel, one GEMM with the scales in the k loop)."""
    bn, bk = layer.weight_block_size
    k = layer.weight.shape[1]
    xq, sx = quantize_fp8_per_token_group(_rows(x, k), group_size=bk)          # [m, k], [m, KB]
    y = scaled_fp8_gemm(xq, sx, layer.weight, layer.weight_scale_inv, (bn, bk), bias, x.dtype)
    return y.view(*x.shape[:-1], y.shape[-1])


def scaled_mm_shape_ok(n: int, k: int) -> bool:
    """torch._scaled_mm's rule: k and n multiples of 16 (mat2 is [k, n] column-major)."""
    return n % 16 == 0 and k % 16 == 0


def prepare_per_tensor_layout(layer: nn.Module) -> None:
    """Keep the weight [n, k] row-major, so weight.t() is the column-major [k, n] mat2 of
    `torch._scaled_mm`, and record whether its shape rules hold."""
    layer.weight.data = layer.weight.data.contiguous()
    n, k = layer.weight.shape
    layer.fp8_use_scaled_mm = layer.weight.is_cuda and scaled_mm_shape_ok(n, k)


def prepare_per_tensor(layer: nn.Module) -> None:
    """Per-tensor fp8: the layout above and a 0-dim float32 `weight_scale`."""
    prepare_per_tensor_layout(layer)
    layer.weight_scale.data = layer.weight_scale.data.float().reshape(())


def _per_tensor_gemm(layer: nn.Module, xq: torch.Tensor, sx: torch.Tensor, bias: torch.Tensor | None,
                     out_dtype: torch.dtype) -> torch.Tensor:
    sw = layer.weight_scale.float()
    if getattr(layer, "fp8_use_scaled_mm", False):
        y = torch._scaled_mm(xq, layer.weight.t(), scale_a=sx.reshape(()).float(), scale_b=sw.reshape(()),
                             out_dtype=out_dtype)                               # [m, n]
        return y if bias is None else y + bias.to(out_dtype)
    return scaled_fp8_gemm(xq, sx, layer.weight, sw, None, bias, out_dtype)


def fp8_matmul_per_tensor(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Dynamic per-tensor e4m3 activations x per-tensor e4m3 weights."""
    k = layer.weight.shape[1]
    xq, sx = quantize_fp8_per_tensor(_rows(x, k))
    y = _per_tensor_gemm(layer, xq, sx, bias, x.dtype)
    return y.view(*x.shape[:-1], y.shape[-1])


def fp8_matmul_per_tensor_static(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Static per-tensor e4m3 activations (x / input_scale, saturated) x per-tensor weights."""
    k = layer.weight.shape[1]
    sx = layer.input_scale.float()
    y = _per_tensor_gemm(layer, quantize_fp8_static(_rows(x, k), sx), sx, bias, x.dtype)
    return y.view(*x.shape[:-1], y.shape[-1])


def prepare_per_token(layer: nn.Module) -> None:
    """Row-wise fp8 (per-token activations, per-channel `weight_scale` [n] or [n, 1])."""
    prepare_per_tensor_layout(layer)
    n, k = layer.weight.shape
    if layer.weight_scale.numel() != n:
        raise ValueError(f"{getattr(layer, 'prefix', 'layer')}.weight_scale: row-wise fp8 needs one "
                         f"scale per output channel ({n}), got shape {tuple(layer.weight_scale.shape)}")
    layer.weight_scale.data = layer.weight_scale.data.float().contiguous()


def fp8_matmul_per_token(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Dynamic per-token e4m3 activations x per-channel e4m3 weights: (xq @ wq.T) * sx[m] * sw[n].

    `torch._scaled_mm` row-wise needs a bf16 output; other dtypes and shapes use the Triton GEMM.
    """
    n, k = layer.weight.shape
    xq, sx = quantize_fp8_per_token(_rows(x, k))                              # [m, k], [m, 1]
    sw = layer.weight_scale.reshape(-1)                                         # [n]
    if getattr(layer, "fp8_use_scaled_mm", False) and x.dtype == torch.bfloat16:
        y = torch._scaled_mm(xq, layer.weight.t(), scale_a=sx, scale_b=sw.view(1, n),
                             out_dtype=torch.bfloat16)                          # [m, n]
        y = y if bias is None else y + bias.to(y.dtype)
    else:
        y = scaled_fp8_gemm(xq, sx, layer.weight, sw, None, bias, x.dtype)
    return y.view(*x.shape[:-1], n)
