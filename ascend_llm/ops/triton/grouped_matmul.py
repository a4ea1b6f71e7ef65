"""Float grouped matmul for MoE experts (op `grouped_matmul`), the CUDA kernel.

Same contract as `ops/cpu_moe.grouped_matmul`: x [M, k] with rows sorted by expert, weight
[E, k, n], group_list [E] cumulative row ends -> [M, n] (rows past group_list[-1] are 0).
The host turns group_list into a table of row tiles, one per BLOCK_M rows of one expert (no
tile spans two experts, empty experts get none), computed with tensor ops only; each program
then multiplies one (tile, BLOCK_N columns) block by its expert's weight, accumulating in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M, BLOCK_N, BLOCK_K = 16, 32, 32


@triton.jit
def _grouped_matmul_kernel(x_ptr, w_ptr, out_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr,
                           N, K, stride_xm, stride_we, stride_wk, stride_om,
                           IEEE_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr):
    tile, pid_n = tl.program_id(0), tl.program_id(1)
    expert = tl.load(tile_expert_ptr + tile).to(tl.int64)
    row_start = tl.load(tile_start_ptr + tile)
    row_end = tl.load(tile_end_ptr + tile)
    rm = row_start + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask, n_mask = rm < row_end, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_base = w_ptr + expert * stride_we
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :],
                    mask=m_mask[:, None] & (kk[None, :] < K), other=0.0)                  # [BM, BK]
        w = tl.load(w_base + kk[:, None] * stride_wk + rn[None, :],
                    mask=(kk[:, None] < K) & n_mask[None, :], other=0.0)                  # [BK, BN]
        if IEEE_FP32:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


def row_tiles(group_list: torch.Tensor, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(expert, row start, row end) per BLOCK_M-row tile of each expert's rows, int32 [num_tiles]."""
    ends = group_list.to(torch.int64)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    tiles_per_expert = (ends - starts + block_m - 1) // block_m                             # [E]
    expert = torch.repeat_interleave(torch.arange(ends.shape[0], device=ends.device), tiles_per_expert)
    first_tile = torch.cumsum(tiles_per_expert, 0) - tiles_per_expert                      # [E]
    index_in_expert = torch.arange(expert.shape[0], device=ends.device) - first_tile[expert]
    start = starts[expert] + index_in_expert * block_m
    return expert.to(torch.int32), start.to(torch.int32), ends[expert].to(torch.int32)


def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, group_list: torch.Tensor) -> torch.Tensor:
    """x [M, k] (rows sorted by expert) @ weight[e] [k, n] per group -> [M, n] in x's dtype."""
    if x.dim() != 2 or weight.dim() != 3 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"grouped_matmul: expected x [M, k] and weight [E, k, n], got x "
                         f"{tuple(x.shape)} and weight {tuple(weight.shape)}")
    if group_list.shape != (weight.shape[0],):
        raise ValueError(f"group_list: expected shape [{weight.shape[0]}], got {tuple(group_list.shape)}")
    x = x.contiguous()
    weight = weight.to(x.dtype).contiguous()
    m, k = x.shape
    n = weight.shape[2]
    out = torch.zeros(m, n, dtype=x.dtype, device=x.device)
    expert, start, end = row_tiles(group_list, BLOCK_M)
    if expert.numel() == 0 or m == 0:
        return out
    grid = (expert.shape[0], triton.cdiv(n, BLOCK_N))
    _grouped_matmul_kernel[grid](x, weight, out, expert, start, end, n, k, x.stride(0),
                                 weight.stride(0), weight.stride(1), out.stride(0),
                                 IEEE_FP32=x.dtype == torch.float32, BLOCK_M=BLOCK_M,
                                 BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return out


def supports_grouped_matmul(dtype: torch.dtype | None = None, **_: object) -> str | None:
    """Float weights (fp32 / fp16 / bf16)."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype={dtype} (float32 / float16 / bfloat16 only)"
    return None
