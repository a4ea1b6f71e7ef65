"""W8A8 on CUDA: activation quantization and the int8 x int8 GEMM with fused dequant.

The integer arithmetic is `ops/cpu_int8.py`'s exactly: activations are divided with IEEE
rounding (`tl.div_rn`; a plain `/` may compile to an approximate division on NVIDIA GPUs) and
rounded half-to-even in fp32 (a magic-number add, exact for |v| < 2^22, applied after the clamp
so it always is), the
GEMM accumulates in int32 (tl.dot of int8 tiles), `quant_bias` is added to the int32 accumulator,
then the fp32 epilogue applies `deq_scale` (static) or `weight_scale * token_scale` (+ float
bias, dynamic) and casts to the output dtype. `torch._int_mm` reaches ~130 TOP/s on an H100,
far under the int8 tensor-core peak; this tiled kernel is what `quant_matmul` runs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rint(v):
    """Round fp32 half-to-even: adding 1.5 * 2^23 leaves no fraction bits (exact for |v| < 2^22)."""
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _quantize_per_tensor_kernel(x_ptr, q_ptr, scale_ptr, offset_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.div_rn(x, tl.load(scale_ptr)) + tl.load(offset_ptr)
    v = _rint(tl.minimum(tl.maximum(v, -128.0), 127.0))
    tl.store(q_ptr + offs, v.to(tl.int8), mask=mask)


def quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Static asymmetric: clamp(round(x / scale + offset), -128, 127); x [T, k] -> int8 [T, k]."""
    x = x.contiguous()
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scale = scale.reshape(1).to(torch.float32)
    offset = offset.reshape(1).to(torch.float32)
    block = 1024
    if x.numel():
        _quantize_per_tensor_kernel[(triton.cdiv(x.numel(), block),)](x, q, scale, offset,
                                                                       x.numel(), BLOCK=block)
    return q


@triton.jit
def _dynamic_quant_kernel(x_ptr, q_ptr, scale_ptr, k, stride_x, stride_q, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < k
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.div_rn(tl.max(tl.abs(x), axis=0), 127.0)
    safe = tl.where(scale > 0, scale, 1.0)
    v = _rint(tl.minimum(tl.maximum(tl.div_rn(x, safe), -128.0), 127.0))
    tl.store(q_ptr + row * stride_q + cols, v.to(tl.int8), mask=mask)
    tl.store(scale_ptr + row, scale)


def dynamic_quant_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token: x [T, k] -> (q int8 [T, k], scale float32 [T]), scale = rowmax|x|/127."""
    x = x.reshape(-1, x.shape[-1]).contiguous()
    num_tokens, k = x.shape
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scale = torch.empty(num_tokens, dtype=torch.float32, device=x.device)
    if num_tokens:
        block = triton.next_power_of_2(k)
        _dynamic_quant_kernel[(num_tokens,)](x, q, scale, k, x.stride(0), q.stride(0), BLOCK=block,
                                             num_warps=max(1, min(16, block // 512)))
    return q, scale


@triton.jit
def _int8_gemm_kernel(a_ptr, b_ptr, c_ptr, scale_ptr, token_scale_ptr, quant_bias_ptr, bias_ptr,
                      M, N, K, stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
                      RAW_INT32: tl.constexpr, HAS_QUANT_BIAS: tl.constexpr,
                      HAS_TOKEN_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr):
    # grouped program order: GROUP_M row tiles share each column tile of B in L2
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % group_rows
    pid_n = (pid % (GROUP_M * num_n)) // group_rows

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak          # [BM, BK]
    b_ptrs = b_ptr + rn[None, :] * stride_bn + rk[:, None] * stride_bk          # [BK, BN] of W.T
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] + k0 < K), other=0)
        b = tl.load(b_ptrs, mask=(rn[None, :] < N) & (rk[:, None] + k0 < K), other=0)
        acc += tl.dot(a, b, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    n_mask = rn < N
    c_mask = (rm[:, None] < M) & n_mask[None, :]
    c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    if RAW_INT32:
        tl.store(c_ptrs, acc, mask=c_mask)
    else:
        if HAS_QUANT_BIAS:
            acc += tl.load(quant_bias_ptr + rn, mask=n_mask, other=0)[None, :]
        out = acc.to(tl.float32) * tl.load(scale_ptr + rn, mask=n_mask, other=0.0)[None, :]
        if HAS_TOKEN_SCALE:
            out = out * tl.load(token_scale_ptr + rm, mask=rm < M, other=0.0)[:, None]
        if HAS_BIAS:
            out = out + tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=c_mask)


def _gemm_config(m: int, n: int, k: int) -> dict[str, int]:
    """Tile sizes by M: decode-sized M gets short row tiles; tiles never exceed the padded dims."""
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    block_n = min(128, max(16, triton.next_power_of_2(n)))
    block_k = min(128, max(32, triton.next_power_of_2(k)))
    warps = 8 if block_m * block_n >= 128 * 128 else 4
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, num_warps=warps,
                num_stages=3)


def _check_int8(q_x: torch.Tensor, weight: torch.Tensor) -> None:
    if q_x.dtype != torch.int8 or weight.dtype != torch.int8:
        raise ValueError(f"quant_matmul: q_x and weight must be int8, got {q_x.dtype} x {weight.dtype}")
    if q_x.dim() != 2 or weight.dim() != 2 or q_x.shape[1] != weight.shape[1]:
        raise ValueError(f"quant_matmul: q_x {tuple(q_x.shape)} and weight {tuple(weight.shape)} "
                         f"must be [T, k] and [n, k]")


def int8_gemm(q_x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None, *,
              quant_bias: torch.Tensor | None = None, token_scale: torch.Tensor | None = None,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """q_x [T, k] int8 x weight [n, k] int8 -> [T, n].

    out_dtype int32: the raw accumulator. Otherwise ((acc + quant_bias) * scale[n]
    (* token_scale[T]) + bias[n]) in fp32, cast to out_dtype.
    """
    _check_int8(q_x, weight)
    m, k = q_x.shape
    n = weight.shape[0]
    raw = out_dtype == torch.int32
    if not raw and scale is None:
        raise ValueError("int8_gemm: a dequantized output needs `scale`")
    out = torch.empty(m, n, dtype=out_dtype, device=q_x.device)
    if m == 0 or n == 0:
        return out
    f32 = lambda t: None if t is None else t.reshape(-1).to(torch.float32).contiguous()  # noqa: E731
    scale_, token_, bias_ = f32(scale), f32(token_scale), f32(bias)
    qbias = None if quant_bias is None else quant_bias.reshape(-1).to(torch.int32).contiguous()
    cfg = _gemm_config(m, n, k)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    dummy = out
    _int8_gemm_kernel[grid](
        q_x, weight, out, dummy if scale_ is None else scale_, dummy if token_ is None else token_,
        dummy if qbias is None else qbias, dummy if bias_ is None else bias_,
        m, n, k, q_x.stride(0), q_x.stride(1), weight.stride(0), weight.stride(1),
        out.stride(0), out.stride(1), RAW_INT32=raw, HAS_QUANT_BIAS=qbias is not None,
        HAS_TOKEN_SCALE=token_ is not None, HAS_BIAS=bias_ is not None, **cfg)
    return out


def quant_matmul(q_x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 out_dtype: torch.dtype, pertoken_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The `quant_matmul` op (`ops.cpu_int8.quant_matmul`'s contract): static, `bias` = int32
    quant_bias added to the accumulator and `scale` = deq_scale; or, with `pertoken_scale`,
    dynamic: acc * scale[n] * pertoken_scale[T] + float `bias`."""
    if pertoken_scale is None:
        return int8_gemm(q_x, weight, scale, quant_bias=bias, out_dtype=out_dtype)
    return int8_gemm(q_x, weight, scale, token_scale=pertoken_scale, bias=bias, out_dtype=out_dtype)
