"""Float linear layers."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ascend_llm.quant.base import QuantMethod


class UnquantizedLinearMethod(QuantMethod):
    """weight [out, in] in the model dtype; y = x @ weight.T + bias via the backend's `linear` kernel."""

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        weight = nn.Parameter(torch.empty(sum(output_sizes), input_size, dtype=params_dtype),
                              requires_grad=False)
        weight.out_dim, weight.in_dim, weight.load_check = 0, 1, float_weight_only
        layer.register_parameter("weight", weight)
        layer.linear_kernel = None

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        ops = getattr(layer, "ops", None)
        if ops is None:
            return
        kernel = ops.bind(layer, "linear", dtype=layer.weight.dtype,
                            shared_weight=getattr(layer, "shared_weight", False))
        kernel.prepare(layer)
        layer.linear_kernel = kernel

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if layer.linear_kernel is None:
            return F.linear(x, layer.weight, bias)
        return layer.linear_kernel.run(layer, x, bias)


def float_weight_only(param: nn.Parameter, loaded: torch.Tensor, name: str) -> torch.Tensor:
    """Refuse integer / packed tensors: a quantized weight must never be cast to float silently
    (e.g. a description marking an int8 layer FLOAT)."""
    if not loaded.is_floating_point():
        raise ValueError(f"{name}: checkpoint tensor has dtype {loaded.dtype}, but the layer is "
                         f"unquantized and expects a floating-point weight")
    return loaded
