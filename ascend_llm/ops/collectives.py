"""Tensor-parallel collectives as registry ops: `all_reduce` and `all_gather`.

Every backend gets the torch.distributed implementation (hccl / nccl / gloo underneath); a
backend may register a higher-priority kernel later (e.g. all-reduce fused with a norm). With a
world size of 1 both are identities and touch nothing.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ascend_llm.ops.registry import Kernel, OpRegistry

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def all_reduce(x: torch.Tensor, parallel: Any, op: str = "sum") -> torch.Tensor:
    """Reduce `x` over the group in place (sum, max or min) and return it."""
    if parallel is None or parallel.world_size == 1:
        return x
    if op not in _REDUCE_OPS:
        raise ValueError(f"op: {op!r} is not one of {sorted(_REDUCE_OPS)}")
    dist.all_reduce(x, op=_REDUCE_OPS[op], group=parallel.group)
    return x


def all_gather(x: torch.Tensor, parallel: Any, dim: int = -1) -> torch.Tensor:
    """x [..., d] on every rank -> the ranks' tensors concatenated along `dim` (rank order)."""
    if parallel is None or parallel.world_size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(parallel.world_size)]
    dist.all_gather(parts, x, group=parallel.group)
    return torch.cat(parts, dim=dim)


def register(registry: OpRegistry, backend: str) -> None:
    """Register both collectives for `backend`."""
    for fn in (all_reduce, all_gather):
        registry.register(Kernel(fn.__name__, backend, f"{backend}.dist.{fn.__name__}", fn))
