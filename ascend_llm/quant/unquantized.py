"""Float linear layers."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ascend_llm.quant.base import QuantMethod


class UnquantizedLinearMethod(QuantMethod):
    """weight [out, in] in the model dtype; y = x @ weight.T + bias."""

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        weight = nn.Parameter(torch.empty(sum(output_sizes), input_size, dtype=params_dtype),
                              requires_grad=False)
        layer.register_parameter("weight", weight)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)
