"""The quantization-method interface (vLLM's three verbs)."""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn as nn


class QuantMethod(ABC):
    """Declares a layer's checkpoint tensors, post-processes them after loading, and computes.

    State (tensors) lives on the layer; the method object holds only configuration.
    """

    @abstractmethod
    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        """Register the checkpoint-layout parameters on `layer` (each with a `weight_loader`)."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Quantize online, re-layout or select kernels once all weights are loaded."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x: [num_tokens, input_size] -> [num_tokens, sum(output_sizes)]."""


class QuantConfig(ABC):
    """Checkpoint- or user-level quantization settings; picks a method per layer."""

    @classmethod
    @abstractmethod
    def get_name(cls) -> str:
        """The `--quantization` name."""

    @abstractmethod
    def get_quant_method(self, layer: nn.Module, prefix: str) -> QuantMethod | None:
        """The method for the layer at `prefix`, or None to keep it unquantized."""

    def input_hadamard_block(self, prefix: str) -> int | None:
        """The block size of the online Hadamard rotation the layer at `prefix` applies to its input
        (its checkpoint weight holds the folded rotation), or None for no rotation."""
        return None

    def online_hadamard_layers(self) -> list[str]:
        """The checkpoint layer names whose weights hold a folded online rotation (every one must
        be built as a Linear that applies it: models/hadamard_layers.py checks), else []."""
        return []

    def hadamard_rotated_names(self, prefix: str) -> list[str]:
        """The listed checkpoint names the layer at `prefix` rotates for (its own name, or the
        shards of a fused layer); [] when it applies no rotation."""
        return []
