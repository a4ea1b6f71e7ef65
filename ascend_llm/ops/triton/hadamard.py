"""`hadamard_transform(x, block_size)` (ops/cpu_hadamard.py) as a Triton GEMM whose right-hand
matrix is never stored: x viewed [rows, b] times the Sylvester Hadamard H_b, each H_b tile made in
registers from its indices (sign = (-1)^popcount(k & n), the parity folded by shifts and xors).
The +-1 tiles are exact in fp16 / bf16, the products accumulate in fp32 (IEEE for fp32 inputs, not
TF32), and 1/sqrt(b) is applied to the fp32 sum before the one rounding to x's dtype.

Block sizes below 16 (tl.dot's smallest tile) step aside to the reference kernel.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl

from ascend_llm.numerics.hadamard import is_power_of_two

MIN_BLOCK = 16


@triton.jit
def _hadamard_kernel(x_ptr, out_ptr, rows, scale, B: tl.constexpr, IEEE_FP32: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_r, pid_n = tl.program_id(0), tl.program_id(1)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    r_mask = rr < rows
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, B, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rr[:, None] * B + rk[None, :], mask=r_mask[:, None], other=0.0)   # [BR, BK]
        bits = rk[:, None] & rn[None, :]                                                        # [BK, BN]
        bits = bits ^ (bits >> 8)
        bits = bits ^ (bits >> 4)
        bits = bits ^ (bits >> 2)
        bits = bits ^ (bits >> 1)
        h = (1.0 - 2.0 * (bits & 1).to(tl.float32)).to(x.dtype)                                 # +-1
        if IEEE_FP32:
            acc += tl.dot(x, h, input_precision="ieee")
        else:
            acc += tl.dot(x, h)
    out = (acc * scale).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rr[:, None] * B + rn[None, :], out, mask=r_mask[:, None])


def supports_hadamard(block_size: int | None = None, **_: Any) -> str | None:
    """Power-of-two blocks from 16 (the smallest tl.dot tile) to 2^16 (the parity fold's reach)."""
    if not is_power_of_two(block_size):
        return f"block_size={block_size!r} is not a power of two >= 2"
    if not MIN_BLOCK <= block_size <= 1 << 16:
        return f"block_size={block_size} is outside [{MIN_BLOCK}, 65536] (tl.dot tiles)"
    return None


def hadamard_transform(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """x [..., d] (d % block_size == 0) -> blockdiag(H_b) x along the last dim, same shape and dtype."""
    rows2d = x.reshape(-1, block_size).contiguous()                      # [rows, b]
    out = torch.empty_like(rows2d)
    rows = rows2d.shape[0]
    block_r = min(64, max(16, triton.next_power_of_2(rows)))
    block_n = block_k = min(64, block_size)
    grid = (triton.cdiv(rows, block_r), block_size // block_n)
    _hadamard_kernel[grid](rows2d, out, rows, 1.0 / math.sqrt(block_size), B=block_size,
                           IEEE_FP32=x.dtype == torch.float32, BLOCK_R=block_r, BLOCK_N=block_n,
                           BLOCK_K=block_k)
    return out.reshape(x.shape)
