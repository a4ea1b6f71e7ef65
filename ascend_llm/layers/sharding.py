"""Tensor-parallel slicing of checkpoint tensors: the one home of the rules every loader uses.

A checkpoint tensor is split into `ranks` equal slices along one dim; a rank copies its slice
into its parameter (or a part of one: a fused shard's rows, one expert). The linear layers
(`layers.linear`) and the expert layer (`layers.moe`) load through these two functions only.
"""
from __future__ import annotations

import torch


def rank_slice(loaded: torch.Tensor, dst: torch.Tensor, dim: int, rank: int, ranks: int,
               name: str) -> torch.Tensor:
    """Slice `rank` of `ranks` along `dim` of a checkpoint tensor, the size of `dst` there.

    ValueError naming the tensor and the full shape expected when the checkpoint tensor does not
    split that way (never a silent truncation)."""
    size = dst.shape[dim]
    expected = list(dst.shape)
    expected[dim] = size * ranks
    if list(loaded.shape) != expected:
        raise ValueError(f"{name}: checkpoint tensor has shape {tuple(loaded.shape)}, expected "
                         f"{tuple(expected)} (split along dim {dim} over {ranks} ranks)")
    return loaded.narrow(dim, rank * size, size)


def copy_checked(dst: torch.Tensor, src: torch.Tensor, name: str, note: str = "") -> None:
    """dst <- src (cast to dst's dtype); ValueError naming the tensor when the shapes differ."""
    if dst.shape != src.shape:
        raise ValueError(f"{name}: checkpoint tensor has shape {tuple(src.shape)}, "
                         f"expected {tuple(dst.shape)}{note}")
    dst.copy_(src)
