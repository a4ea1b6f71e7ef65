"""Block-diagonal Walsh-Hadamard rotation (QuaRot's online R4 before `down_proj`).

The normalized Sylvester Hadamard matrix H_b[i, j] = (-1)^popcount(i & j) / sqrt(b) (b a power of
two) is symmetric and orthonormal, so H_b @ H_b = I. A checkpoint folds the block-diagonal
rotation into a Linear's weight, W' = W @ blockdiag(H_b) (`rotate_input_blocks`), and the runtime
rotates the layer's input online with the same blocks: W' @ (blockdiag(H_b) @ x) = W @ x.

Pure tensor math (no module state): the op registry's kernels (`ops/*hadamard*`) and offline
writers both build on these.
"""
from __future__ import annotations

import math

import torch


def is_power_of_two(value: object) -> bool:
    """True for an int (not a bool) 2^m with m >= 1."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 2 and value & (value - 1) == 0


def hadamard_matrix(block_size: int, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """The normalized Sylvester Hadamard matrix [block_size, block_size], built in float64 and cast
    once (entries +-1/sqrt(b); exact in any float dtype when b is a power of 4)."""
    if not is_power_of_two(block_size):
        raise ValueError(f"hadamard block_size must be a power of two >= 2, got {block_size!r}")
    index = torch.arange(block_size, device=device)
    both = index[:, None] & index[None, :]                                      # [b, b]
    parity = torch.zeros_like(both)
    for bit in range(block_size.bit_length() - 1):
        parity ^= (both >> bit) & 1
    signs = 1 - 2 * parity.to(torch.float64)                                    # (-1)^popcount
    return (signs / math.sqrt(block_size)).to(dtype)


def hadamard_transform_fwht(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """x [..., d] -> blockdiag(H_b) applied to the last dim, by the fast Walsh-Hadamard butterfly in
    float64 (log2(b) add/subtract stages, no matrix): the independent reference the kernels are
    tested against. Returns float64."""
    d = x.shape[-1]
    if not is_power_of_two(block_size) or d % block_size:
        raise ValueError(f"hadamard_transform: block_size {block_size!r} must be a power of two "
                         f"dividing the last dim {d}")
    y = x.to(torch.float64).reshape(-1, block_size)                             # [rows, b]
    half = 1
    while half < block_size:
        y = y.view(-1, block_size // (2 * half), 2, half)
        a, c = y[:, :, 0], y[:, :, 1]
        y = torch.stack((a + c, a - c), dim=2)
        half *= 2
    return (y.reshape(x.shape) / math.sqrt(block_size))


def rotate_input_blocks(weight: torch.Tensor, block_size: int) -> torch.Tensor:
    """W [n, k] -> W @ blockdiag(H_b) [n, k] (k % b == 0), computed in float64, returned in W's
    dtype: the weight a checkpoint stores for a layer whose input the runtime rotates."""
    n, k = weight.shape
    if k % block_size:
        raise ValueError(f"rotate_input_blocks: block_size {block_size} does not divide the input dim {k}")
    h = hadamard_matrix(block_size, torch.float64, weight.device)
    rotated = weight.to(torch.float64).reshape(n, k // block_size, block_size) @ h   # [n, k/b, b]
    return rotated.reshape(n, k).to(weight.dtype)
