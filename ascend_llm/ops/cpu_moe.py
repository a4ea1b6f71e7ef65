"""CPU reference of the MoE grouped matmul (op `grouped_matmul`) and its per-expert driver.

Rows of x are sorted by expert; `group_list` [E] int64 holds each expert's cumulative row end
(npu_grouped_matmul's group_list_type 0). Only experts that received rows are visited, so a
decode step with a handful of active experts costs a handful of matmuls, not E.
"""
from __future__ import annotations

from typing import Callable

import torch

from ascend_llm.ops.registry import Kernel, OpRegistry

BACKEND = "cpu"
ExpertMatmul = Callable[[int, torch.Tensor], torch.Tensor]


def check_group_list(group_list: torch.Tensor, num_experts: int, num_rows: int) -> None:
    """ValueError unless group_list is a non-decreasing int [num_experts] ending <= num_rows."""
    if group_list.dim() != 1 or group_list.shape[0] != num_experts:
        raise ValueError(f"group_list: expected shape [{num_experts}] (one cumulative row end per "
                         f"expert), got {tuple(group_list.shape)}")
    if group_list.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"group_list: expected an int32/int64 tensor, got {group_list.dtype}")
    if num_experts and int(group_list[-1]) > num_rows:
        raise ValueError(f"group_list: last row end {int(group_list[-1])} exceeds x's {num_rows} rows")


def active_groups(group_list: torch.Tensor) -> list[tuple[int, int, int]]:
    """(expert, row start, row end) of every expert with at least one row."""
    ends = group_list.to(torch.int64)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    active = torch.nonzero(ends > starts).flatten()                       # [A]
    if bool((ends < starts).any()):
        raise ValueError("group_list: cumulative row ends must be non-decreasing")
    rows = torch.stack([active, starts[active], ends[active]], dim=1)     # [A, 3]
    return [tuple(r) for r in rows.tolist()]


def grouped_apply(x: torch.Tensor, group_list: torch.Tensor, out_features: int,
                  expert_matmul: ExpertMatmul, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """out[rows of e] = expert_matmul(e, x[rows of e]) for each active expert; other rows 0.

    x: [M, k]; returns [M, out_features] in `out_dtype` (default x.dtype).
    """
    out = torch.zeros(x.shape[0], out_features, dtype=out_dtype or x.dtype, device=x.device)
    for expert, start, end in active_groups(group_list):
        out[start:end] = expert_matmul(expert, x[start:end])
    return out


def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, group_list: torch.Tensor) -> torch.Tensor:
    """x [M, k] (rows sorted by expert) @ weight[e] [k, n] per group -> [M, n] in x's dtype.

    fp32 math (the reference every backend is compared with); rows past group_list[-1] are 0.
    """
    if x.dim() != 2 or weight.dim() != 3 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"grouped_matmul: expected x [M, k] and weight [E, k, n], got x "
                         f"{tuple(x.shape)} and weight {tuple(weight.shape)}")
    check_group_list(group_list, weight.shape[0], x.shape[0])
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return grouped_apply(x, group_list, weight.shape[2], lambda e, rows: rows @ weight[e])
    return grouped_apply(x, group_list, weight.shape[2],
                         lambda e, rows: (rows.float() @ weight[e].float()).to(x.dtype))


def register(registry: OpRegistry) -> None:
    """Register the CPU reference `grouped_matmul`."""
    registry.register(Kernel("grouped_matmul", BACKEND, "cpu.grouped_matmul", grouped_matmul))
