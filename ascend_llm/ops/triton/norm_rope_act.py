"""Fused RMSNorm (+ residual), neox rotary embedding and SiLU-and-mul.

Same math as `ops/cpu.py`: statistics in fp32, RMSNorm's normalised value cast to the input
dtype before the weight multiply (HF order), rotary in fp32, SiLU in fp32 cast back before the
multiply by `up`. One program per token row (norm, rope) or per row x column block (act).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, hidden, eps,
                     stride_x, stride_res, stride_out, stride_res_out,
                     ADD_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if ADD_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)         # torch adds in x.dtype
        tl.store(res_out_ptr + row * stride_res_out + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / hidden + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = (xf * rstd).to(x.dtype).to(tl.float32) * w
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _norm_out(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])                 # [num_tokens, hidden]
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., hidden] -> same shape (dtype promoted with weight's, as the reference)."""
    x2 = _rows(x)
    out = _norm_out(x2, weight)
    hidden = x2.shape[1]
    if x2.shape[0] == 0:
        return out.view(x.shape)
    _rms_norm_kernel[(x2.shape[0],)](x2, x2, weight, out, out, hidden, eps,
                                     x2.stride(0), 0, out.stride(0), 0, ADD_RESIDUAL=False,
                                     BLOCK=triton.next_power_of_2(hidden), num_warps=_warps(hidden))
    return out.view(x.shape)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual); x, residual: [..., hidden]."""
    x2, r2 = _rows(x), _rows(residual)
    hidden = x2.shape[1]
    res_out = torch.empty_like(x2)                 # [num_tokens, hidden] x.dtype
    out = _norm_out(x2, weight)
    if x2.shape[0] == 0:
        return out.view(x.shape), res_out.view(x.shape)
    _rms_norm_kernel[(x2.shape[0],)](x2, r2, weight, out, res_out, hidden, eps,
                                     x2.stride(0), r2.stride(0), out.stride(0), res_out.stride(0),
                                     ADD_RESIDUAL=True, BLOCK=triton.next_power_of_2(hidden),
                                     num_warps=_warps(hidden))
    return out.view(x.shape), res_out.view(x.shape)


def _warps(width: int) -> int:
    return max(1, min(16, triton.next_power_of_2(width) // 256))


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, num_heads, head_dim,
                 stride_xt, stride_xh, stride_ct, stride_st, stride_ot, stride_oh,
                 BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    half = head_dim // 2
    rolled = tl.where(dims < half, dims + half, dims - half)       # roll(x, D/2)[d] = x[d - D/2]
    mask = (heads[:, None] < num_heads) & (dims[None, :] < head_dim)
    base = x_ptr + token * stride_xt + heads[:, None] * stride_xh
    x = tl.load(base + dims[None, :], mask=mask, other=0.0)
    x_rot = tl.load(base + rolled[None, :], mask=mask, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + token * stride_ct + dims, mask=dims < head_dim, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + token * stride_st + dims, mask=dims < head_dim, other=0.0).to(tl.float32)
    y = x.to(tl.float32) * cos[None, :] + x_rot * sin[None, :]
    tl.store(out_ptr + token * stride_ot + heads[:, None] * stride_oh + dims[None, :],
             y.to(out_ptr.dtype.element_ty), mask=mask)


def _rope_one(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [num_tokens, num_heads, head_dim] (head_dim contiguous); cos/sin: [num_tokens, 1, head_dim]
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    num_tokens, num_heads, head_dim = x.shape
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if num_tokens == 0:
        return out
    block_h = min(16, triton.next_power_of_2(num_heads))
    grid = (num_tokens, triton.cdiv(num_heads, block_h))
    _rope_kernel[grid](x, cos, sin, out, num_heads, head_dim, x.stride(0), x.stride(1),
                       cos.stride(0), sin.stride(0), out.stride(0), out.stride(1),
                       BLOCK_H=block_h, BLOCK_D=triton.next_power_of_2(head_dim))
    return out


def rope(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox rotary embedding, `ops.cpu.rope`'s contract: query [T, H, D], key [T, Hkv, D],
    cos = (cos | cos), sin = (-sin | sin) [T, 1, D]; returns new (query, key)."""
    if query.shape[-1] % 2:
        raise ValueError(f"rope: head_dim must be even, got {query.shape[-1]}")
    return _rope_one(query, cos, sin), _rope_one(key, cos, sin)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, d, stride_x, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)                  # F.silu rounds to x.dtype
    tl.store(out_ptr + row * stride_out + cols,
             (act.to(tl.float32) * up.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2 * d] (gate | up) -> [..., d]."""
    x2 = _rows(x)
    d = x2.shape[1] // 2
    out = torch.empty(x2.shape[0], d, dtype=x.dtype, device=x.device)   # [num_tokens, d]
    block = min(1024, triton.next_power_of_2(d))
    if x2.shape[0] == 0 or d == 0:
        return out.view(*x.shape[:-1], d)
    _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](x2, out, d, x2.stride(0),
                                                               out.stride(0), BLOCK=block)
    return out.view(*x.shape[:-1], d)
