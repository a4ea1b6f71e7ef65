"""CPU kernel of `hadamard_transform(x, block_size)`: x [..., d] -> each block of `block_size`
along the last dim multiplied by the normalized Hadamard matrix H_b (numerics/hadamard.py), same
shape and dtype as x. The online rotation before a Linear whose checkpoint weight was rotated
(`online_hadamard` in an msModelSlim description; layers/linear.py applies it).

One fp32 matmul [rows, b] @ H_b with H_b cached per (block size, device), rounded once to x's
dtype. Chosen over the in-place fast Walsh-Hadamard butterfly (log2(b) add/subtract stages) by a
measurement at b = 512, d = 1536 (SmolLM2's down_proj input), one thread on the shared AMD EPYC
host: fp32 1 / 16 / 256 rows 68 / 288 / 4846 us (matmul) vs 110 / 277 / 3864 us (butterfly); bf16
47 / 153 / 1830 us vs 132 / 540 / 7015 us. Decode (few rows) and bf16 favour the matmul. The
butterfly stays as the float64 reference (`numerics.hadamard.hadamard_transform_fwht`) that every
backend's kernel is tested against.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ascend_llm.numerics.hadamard import hadamard_matrix, is_power_of_two
from ascend_llm.ops.registry import Kernel, OpRegistry

OP = "hadamard_transform"


def supports_hadamard(block_size: int | None = None, **_: Any) -> str | None:
    """Any power-of-two block size (the layer checks that it divides its input)."""
    return None if is_power_of_two(block_size) else f"block_size={block_size!r} is not a power of two >= 2"


def layer_device(layer: nn.Module) -> torch.device:
    """Where the layer's tensors live (the device its input will be on)."""
    tensor = next(iter(layer.parameters(recurse=False)), None)
    return tensor.device if tensor is not None else torch.device("cpu")


class HadamardMatmul:
    """`hadamard_transform` as one matmul per block with a cached H_b.

    `matrix_dtype` None: H_b is cached in x's dtype and the matmul runs in it (the NPU's cube unit
    accumulates in fp32 either way); torch.float32: x is upcast, the product rounded once. Matrices
    are built once per (block size, dtype, device), by `prepare` after a layer binds the op (so graph
    capture and torch.compile find them ready) or on first use.
    """

    def __init__(self, matrix_dtype: torch.dtype | None = torch.float32) -> None:
        self.matrix_dtype = matrix_dtype
        self._matrices: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}

    def matrix(self, block_size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """H_b [b, b] in the compute dtype for inputs of `dtype` on `device`."""
        dtype = self.matrix_dtype or dtype
        key = (block_size, dtype, torch.device(device))
        h = self._matrices.get(key)
        if h is None:
            h = hadamard_matrix(block_size, dtype, device)
            self._matrices[key] = h
        return h

    def prepare(self, layer: nn.Module) -> None:
        """Build the matrix of the layer's block size, dtype and device ahead of the first call."""
        self.matrix(layer.input_hadamard_block, layer.params_dtype, layer_device(layer))

    def __call__(self, x: torch.Tensor, block_size: int) -> torch.Tensor:
        """x [..., d] (d % block_size == 0) -> same shape and dtype."""
        h = self.matrix(block_size, x.dtype, x.device)                          # [b, b]
        rows = x.reshape(-1, block_size).to(h.dtype)                            # [T * d / b, b]
        return torch.matmul(rows, h).to(x.dtype).reshape(x.shape)


def register(registry: OpRegistry) -> None:
    """The CPU kernel (also the reference fallback of backends without their own)."""
    run = HadamardMatmul(torch.float32)
    registry.register(Kernel(OP, "cpu", "cpu.hadamard_matmul", run, supports_hadamard, run.prepare))
