"""Group-wise integer weights: int4 / int8 codes with one scale (and optionally one zero point)
per `group_size` consecutive input channels of each output row.

Semantics (compressed-tensors' W4A16 / W8A16 `pack-quantized`, GPTQ / AWQ style):
W[r, c] = (code[r, c] - zero[r, c // g]) * scale[r, c // g], for codes int8 [n, k],
scale [n, G] and zero [n, G] (None: symmetric), G = ceil(k / g); the last group may be short.
A channel-wise layout is the special case g >= k (one group per row).
"""
from __future__ import annotations

import math

import torch


def num_groups(k: int, group_size: int) -> int:
    """G = ceil(k / group_size): groups along an input dim of size k."""
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    return math.ceil(k / group_size)


def expand_groups(values: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    """Per-group values [n, G] -> per-input-channel float32 [n, k] (group j covers columns
    j * g .. (j + 1) * g - 1)."""
    return values.float().repeat_interleave(group_size, dim=1)[:, :k]


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                      group_size: int) -> torch.Tensor:
    """int8 codes [n, k], scale [n, G], zero [n, G] or None -> float32 weight [n, k]."""
    k = codes.shape[1]
    if scale.shape[1] != num_groups(k, group_size):
        raise ValueError(f"scale: {scale.shape[1]} groups for k={k} and group size {group_size} "
                         f"(expected {num_groups(k, group_size)})")
    q = codes.float()                                                  # [n, k]
    if zero is not None:
        q = q - expand_groups(zero, group_size, k)
    return q * expand_groups(scale, group_size, k)
