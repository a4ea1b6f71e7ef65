"""Gated activations."""
from __future__ import annotations

import torch
import torch.nn as nn

from ascend_llm.ops.registry import OpSet


class SiluAndMul(nn.Module):
    """[num_tokens, 2 * d] (gate | up) -> silu(gate) * up, [num_tokens, d]."""

    def __init__(self, ops: OpSet) -> None:
        super().__init__()
        self._silu_and_mul = ops.get("silu_and_mul")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._silu_and_mul(x)
