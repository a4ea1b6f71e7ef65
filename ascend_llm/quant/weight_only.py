"""Online weight-only int8 / int4 quantization (FastDeploy `wint8` / `wint4`).

The float checkpoint loads into a float `weight` [n, k] through the layer's usual weight_loader
(so TP sharding and fused shards need nothing new); `process_weights_after_loading` then
quantizes per output channel, symmetric (scale = amax / 127 or amax / 7), replaces `weight` with
int8 [n, k] (wint8) or packed uint8 [n, ceil(k/2)] (wint4, see `primitives.pack_int4`), adds
`weight_scale` float32 [n], and drops the float copy. Activations stay in the model dtype.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ascend_llm.ops import cpu_quant
from ascend_llm.quant import primitives as P
from ascend_llm.quant.base import QuantConfig, QuantMethod


class WeightOnlyLinearMethod(QuantMethod):
    """Per-channel symmetric int8/int4 weights, float activations; op `weight_only_matmul`."""

    def __init__(self, bits: int) -> None:
        P.int_qmax(bits)              # validates bits
        self.bits = bits

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        weight = nn.Parameter(torch.empty(sum(output_sizes), input_size, dtype=params_dtype),
                              requires_grad=False)                  # [n, k] float until quantized
        layer.register_parameter("weight", weight)
        layer.quant_bits = self.bits
        layer.in_features_k = input_size
        layer.weight_only_kernel = None

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if layer.weight.dtype in (torch.int8, torch.uint8):
            raise ValueError(f"{getattr(layer, 'prefix', 'layer')}.weight: already quantized "
                             f"({layer.weight.dtype}); process_weights_after_loading ran twice")
        act_dtype = layer.weight.dtype                                     # the model dtype
        q, scale = P.quantize_per_channel(layer.weight.data, self.bits)   # [n, k] int8, [n]
        if self.bits == 4:
            q = P.pack_int4(q)                                             # [n, ceil(k/2)] uint8
        layer.weight = nn.Parameter(q, requires_grad=False)   # replaces (frees) the float weight
        layer.weight_scale = nn.Parameter(scale, requires_grad=False)
        ops = getattr(layer, "ops", None)
        if ops is not None:
            kernel = ops.select("weight_only_matmul", bits=self.bits, dtype=act_dtype)
            kernel.prepare(layer)
            layer.weight_only_kernel = kernel

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if layer.weight_only_kernel is None:          # a bare layer (no backend): the CPU reference
            return cpu_quant.weight_only_matmul(layer, x, bias)
        return layer.weight_only_kernel.run(layer, x, bias)


class WeightOnlyConfig(QuantConfig):
    """`wint8` / `wint4`: every linear layer built with this config is weight-only quantized
    (the LM head and embeddings are built without a quant config and stay float)."""

    bits: int = 8

    @classmethod
    def get_name(cls) -> str:
        return f"wint{cls.bits}"

    def get_quant_method(self, layer: nn.Module, prefix: str) -> QuantMethod | None:
        return WeightOnlyLinearMethod(self.bits)


class WInt8Config(WeightOnlyConfig):
    """FastDeploy `wint8`: int8 per-channel weights."""
    bits = 8


class WInt4Config(WeightOnlyConfig):
    """FastDeploy `wint4`: int4 per-channel weights, two per byte."""
    bits = 4
