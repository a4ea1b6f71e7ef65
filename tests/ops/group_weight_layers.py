"""Random layers in the state `GroupWeightOnlyLinearMethod` leaves after loading (the input of the
`weight_only_group_matmul` kernels), for the per-backend kernel tests."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ascend_llm.ops.registry import Kernel, OpSet


def group_layer(n: int, k: int, bits: int, group_size: int | None, asymmetric: bool,
                dtype: torch.dtype, seed: int) -> nn.Module:
    """Codes int8 [n, k] over the whole signed range of `bits`, scales float32 [n, G] in
    [1e-3, 2.1e-2], zero points int8 [n, G] over the same range as the codes (compressed-tensors
    stores signed zero points) or None; group_size None is one group per row."""
    gen = torch.Generator().manual_seed(seed)
    g = group_size or k
    groups = math.ceil(k / g)
    low, high = -(1 << (bits - 1)), 1 << (bits - 1)
    layer = nn.Module()
    layer.prefix = f"test.int{bits}.g{g}"
    layer.weight = nn.Parameter(torch.randint(low, high, (n, k), generator=gen, dtype=torch.int8),
                                requires_grad=False)                                   # [n, k]
    layer.weight_scale = nn.Parameter(torch.rand(n, groups, generator=gen) * 0.02 + 1e-3,
                                      requires_grad=False)                             # [n, G]
    zero = torch.randint(low, high, (n, groups), generator=gen, dtype=torch.int8) if asymmetric else None
    layer.weight_zero_point = None if zero is None else nn.Parameter(zero, requires_grad=False)
    layer.group_size, layer.quant_bits, layer.in_features_k, layer.act_dtype = g, bits, k, dtype
    return layer


def bind(layer: nn.Module, ops: OpSet) -> Kernel:
    """Select the op set's kernel for the layer's traits (as the quant method does) and prepare it."""
    n, k = layer.weight.shape
    kernel = ops.select("weight_only_group_matmul", bits=layer.quant_bits, dtype=layer.act_dtype,
                        group_size=layer.group_size, k=k, n=n, asymmetric=layer.weight_zero_point is not None)
    kernel.prepare(layer)
    return kernel


def dequantized(layer: nn.Module) -> torch.Tensor:
    """The float64 weight [n, k] by the format's definition, element by element:
    W[r, c] = (code[r, c] - zero[r, c // g]) * scale[r, c // g]."""
    n, k = layer.weight.shape
    cols = torch.arange(k) // layer.group_size                                         # [k] group of c
    q = layer.weight.double()
    if layer.weight_zero_point is not None:
        q = q - layer.weight_zero_point.double()[:, cols]
    return q * layer.weight_scale.double()[:, cols]
