"""Shared helpers for the quantized-linear tests: a float-loaded, then quantized, layer."""
from __future__ import annotations

import torch

from ascend_llm.layers.linear import ReplicatedLinear
from ascend_llm.ops import build_op_set

OPS = build_op_set("cpu")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def loaded_linear(config, k: int, n: int, bias: bool, seed: int, ops=OPS,
                  prefix: str = "model.layers.0.self_attn.o_proj") -> tuple:
    """A [k -> n] layer with random float weights loaded and `config`'s method applied."""
    layer = ReplicatedLinear(k, n, bias=bias, quant_config=config, prefix=prefix, ops=ops)
    w = torch.randn(n, k, generator=gen(seed)) * 0.1                  # [n, k]
    layer.weight.weight_loader(layer.weight, w)
    b = torch.randn(n, generator=gen(seed + 1)) if bias else None
    if bias:
        layer.bias.weight_loader(layer.bias, b)
    layer.quant_method.process_weights_after_loading(layer)
    return layer, w, b
