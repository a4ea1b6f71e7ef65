"""Float linear layers."""
from __future__ import annotations

import functools
from typing import Any

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
        weight.weight_loader = functools.partial(_load_float_weight, layer)
        layer.register_parameter("weight", weight)
        layer.linear_kernel = None

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        ops = getattr(layer, "ops", None)
        if ops is None:
            return
        kernel = ops.select("linear", dtype=layer.weight.dtype,
                            shared_weight=getattr(layer, "shared_weight", False))
        kernel.prepare(layer)
        layer.linear_kernel = kernel

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if layer.linear_kernel is None:
            return F.linear(x, layer.weight, bias)
        return layer.linear_kernel.run(layer, x, bias)


def _load_float_weight(layer: nn.Module, param: nn.Parameter, loaded: torch.Tensor,
                       shard_id: Any = None) -> None:
    """The layer's own loader, after refusing integer / packed tensors: a quantized weight must
    never be cast to float silently (e.g. a description marking an int8 layer FLOAT)."""
    name = getattr(layer, "prefix", "layer") + ".weight" + ("" if shard_id is None else f"[{shard_id}]")
    if not loaded.is_floating_point():
        raise ValueError(f"{name}: checkpoint tensor has dtype {loaded.dtype}, but the layer is "
                         f"unquantized and expects a floating-point weight")
    own_loader = getattr(layer, "weight_loader", None)
    if own_loader is not None:
        own_loader(param, loaded, shard_id)
        return
    if param.shape != loaded.shape:                       # layers without one (the LM head)
        raise ValueError(f"{name}: checkpoint tensor has shape {tuple(loaded.shape)}, "
                         f"expected {tuple(param.shape)}")
    param.data.copy_(loaded)
