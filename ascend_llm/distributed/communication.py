"""Collectives that quantization methods need while processing weights (not in the forward).

Online quantization runs after sharded float loading; where a scale covers more than this rank's
slice (per-tensor fp8, per-channel scales of row-parallel layers whose k is split) the local
amax is max-reduced over the group so every rank quantizes exactly as TP=1 would.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def is_tensor_parallel(layer: nn.Module) -> bool:
    """Whether `layer` runs in a tensor-parallel group of more than one rank."""
    parallel = getattr(layer, "parallel", None)
    return parallel is not None and parallel.is_distributed


def splits_input(layer: nn.Module) -> bool:
    """Whether `layer` holds only a slice of its input dim (row-parallel with tp_size > 1).

    Row-parallel layers say so with the class attribute `shards_input_dim` (`layers.linear.
    RowParallelLinear` and its subclasses), read here without importing the layers."""
    return getattr(layer, "shards_input_dim", False) is True and is_tensor_parallel(layer)


def group_max(layer: nn.Module, values: torch.Tensor) -> torch.Tensor:
    """Element-wise max of `values` over the layer's group (identity without one)."""
    if not is_tensor_parallel(layer):
        return values
    values = values.clone()
    ops = getattr(layer, "ops", None)
    if ops is not None:
        return ops.get("all_reduce")(values, layer.parallel, "max")
    from ascend_llm.ops.collectives import all_reduce
    return all_reduce(values, layer.parallel, "max")
