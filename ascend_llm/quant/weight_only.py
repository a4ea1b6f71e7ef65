"""Online weight-only int8 / int4 quantization (FastDeploy `wint8` / `wint4`).

The float checkpoint loads into a float `weight` [n, k] through the layer's usual weight_loader
(so TP sharding and fused shards need nothing new); `process_weights_after_loading` then
quantizes per output channel, symmetric (scale = amax / 127 or amax / 7), replaces `weight` with
int8 [n, k] (wint8) or packed uint8 [n, ceil(k/2)] (wint4, see `primitives.pack_int4`), adds
`weight_scale` float32 [n], and drops the float copy. Activations stay in the model dtype.

Pre-quantized FastDeploy checkpoints (`quantization_config: {quantization: wint8|wint4}`,
FastDeploy's `is_quantized` default: true) load `quant_weight` + `weight_scale` [n]
(`WeightOnlyCheckpointConfig`); the stored layout, FastDeploy's CUTLASS one by default
(`is_permuted`), is read into the row-major kernel layout at load time: quant/weight_only_layout.py.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ascend_llm.distributed.communication import group_max, splits_input
from ascend_llm.numerics import primitives as P
from ascend_llm.ops import cpu_quant
from ascend_llm.quant.base import QuantConfig, QuantMethod
from ascend_llm.quant.moe_weight_only import OnlineWeightOnlyMoEMethod, PrequantWeightOnlyMoEMethod
from ascend_llm.quant.param_loading import add_param, check_loaded, shard_names_for
from ascend_llm.quant.weight_only_layout import LEGACY_WEIGHT, QUANT_WEIGHT, WeightOnlyLayout, read_is_permuted


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
        layer.params_dtype = act_dtype
        q, scale = quantize_per_channel_tp(layer, self.bits)              # [n, k] int8, [n]
        if self.bits == 4:
            q = P.pack_int4(q)                                             # [n, ceil(k/2)] uint8
        layer.weight = nn.Parameter(q, requires_grad=False)   # replaces (frees) the float weight
        layer.weight_scale = nn.Parameter(scale, requires_grad=False)
        bind_weight_only_kernel(layer, self.bits, act_dtype)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return apply_weight_only(layer, x, bias)


def quantize_per_channel_tp(layer: nn.Module, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`P.quantize_per_channel` of the layer's float weight; a row-parallel rank (k split) uses
    the scale of the whole row, max-reduced over the group, so its codes equal TP=1's slice."""
    q, scale = P.quantize_per_channel(layer.weight.data, bits)             # [n, k_r], [n]
    if not splits_input(layer):
        return q, scale
    scale = group_max(layer, scale)             # amax -> scale is monotonic: max of scales
    qmax = P.int_qmax(bits)
    q = torch.round(layer.weight.data.float() / scale[:, None]).clamp_(-qmax, qmax).to(torch.int8)
    return q, scale


def bind_weight_only_kernel(layer: nn.Module, bits: int, act_dtype: torch.dtype) -> None:
    """Select the backend's `weight_only_matmul` kernel for `bits` and prepare the layer for it."""
    ops = getattr(layer, "ops", None)
    if ops is not None:
        kernel = ops.bind(layer, "weight_only_matmul", bits=bits, dtype=act_dtype)
        kernel.prepare(layer)
        layer.weight_only_kernel = kernel


def apply_weight_only(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The bound kernel, or the CPU reference for a bare layer (no backend)."""
    if layer.weight_only_kernel is None:
        if layer.quant_bits == 2:
            return cpu_quant.weight_only_matmul_wint2(layer, x, bias)
        return cpu_quant.weight_only_matmul(layer, x, bias)
    return layer.weight_only_kernel.run(layer, x, bias)


class PrequantWeightOnlyLinearMethod(QuantMethod):
    """Pre-quantized wint8 / wint4: `quant_weight` (layout: quant/weight_only_layout.py) + `weight_scale` [n].

    During loading the layer holds `quant_weight` (already converted to the kernel layout by its
    load_check) and a `weight` entry: with `is_permuted: false` an alias of the same storage (the
    older ascend-llm name), else a refusal. After loading only `weight` (kernel layout) remains.
    """

    def __init__(self, bits: int, shard_names: tuple[str, ...] = (), permuted: bool = False) -> None:
        P.int_qmax(bits)              # validates bits
        self.bits, self.shard_names = bits, shard_names
        self.layout = WeightOnlyLayout(bits, permuted)

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        n = sum(output_sizes)
        if self.bits == 4 and splits_input_dim(layer) and input_size % 2:
            raise ValueError(f"{layer.prefix}: packed int4 weights split along k need an even "
                             f"per-rank input size, got {input_size}")
        if self.bits == 8:
            shape, dtype = (n, input_size), torch.int8                                   # [n, k]
        else:
            shape, dtype = (n, (input_size + 1) // 2), torch.uint8                        # [n, k/2]
        quant = add_param(layer, QUANT_WEIGHT, shape, dtype, out_dim=0, in_dim=1)
        quant.load_check, quant.load_optional = self.layout.to_kernel, True
        legacy = add_param(layer, LEGACY_WEIGHT, shape if not self.layout.permuted else (0,), dtype,
                           out_dim=0, in_dim=1)
        if self.layout.permuted:
            legacy.load_check = self.layout.refuse_legacy_name
        else:
            legacy.data, legacy.load_check = quant.data, self.layout.to_kernel     # one storage
        legacy.load_optional = True
        add_param(layer, "weight_scale", (n,), torch.float32, out_dim=0)                   # [n]
        layer.quant_bits, layer.in_features_k = self.bits, input_size
        layer.weight_only_kernel, layer.act_dtype = None, params_dtype
        layer.params_dtype = params_dtype      # the model dtype, as the online method records it

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        self._check_weight_loaded(layer)
        check_loaded(layer, ("weight_scale",), self.shard_names)
        scale = layer.weight_scale.data
        if not bool(torch.isfinite(scale).all() and (scale >= 0).all()):
            raise ValueError(f"{layer.prefix}.weight_scale: must be finite and >= 0")
        codes = layer.quant_weight.data                         # [n, k] int8 / [n, k/2] uint8
        del layer.quant_weight, layer.weight
        layer.weight = nn.Parameter(codes, requires_grad=False)
        bind_weight_only_kernel(layer, self.bits, layer.act_dtype)

    def _check_weight_loaded(self, layer: nn.Module) -> None:
        """Every fused shard loaded once, as `quant_weight` or (row-major only) `weight`."""
        loaded = getattr(layer, "loaded_shards", set())
        for index in range(len(layer.output_sizes)):
            names = [name for name in (QUANT_WEIGHT, LEGACY_WEIGHT) if (name, index) in loaded]
            if len(names) == 2:
                raise ValueError(f"{layer.prefix}: checkpoint has both '{QUANT_WEIGHT}' and "
                                 f"'{LEGACY_WEIGHT}' for shard {index}; keep one")
            if not names:
                check_loaded(layer, (QUANT_WEIGHT,), self.shard_names)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return apply_weight_only(layer, x, bias)


def splits_input_dim(layer: nn.Module) -> bool:
    """Row-parallel with more than one rank (known at create_weights time, before any group)."""
    return getattr(layer, "shards_input_dim", False) and getattr(layer, "tp_size", 1) > 1


class WeightOnlyConfig(QuantConfig):
    """`wint8` / `wint4`: every linear layer built with this config is weight-only quantized
    (the LM head and embeddings are built without a quant config and stay float)."""

    bits: int = 8

    @classmethod
    def get_name(cls) -> str:
        return f"wint{cls.bits}"

    def get_quant_method(self, layer: nn.Module, prefix: str) -> QuantMethod | None:
        if getattr(layer, "is_fused_moe", False):      # MoE experts: quant/moe_*.py
            return OnlineWeightOnlyMoEMethod(self.bits)
        return WeightOnlyLinearMethod(self.bits)


class WInt8Config(WeightOnlyConfig):
    """FastDeploy `wint8`: int8 per-channel weights."""
    bits = 8


class WInt4Config(WeightOnlyConfig):
    """FastDeploy `wint4`: int4 per-channel weights, two per byte."""
    bits = 4


class WeightOnlyCheckpointConfig(QuantConfig):
    """A FastDeploy wint8 / wint4 checkpoint (`quantization_config.is_quantized: true`).

    `is_permuted`: the stored layout (quant/weight_only_layout.py); parsing a checkpoint's config
    defaults it to FastDeploy's true (`weight_only_config_from_checkpoint`), this constructor to
    the row-major false of hand-built configs.
    """

    def __init__(self, bits: int, packed_modules: dict[str, tuple[str, ...]] | None = None,
                 is_permuted: bool = False) -> None:
        self.bits, self.is_permuted = bits, is_permuted
        self.packed_modules = dict(packed_modules or {})

    def get_name(self) -> str:        # the checkpoint's own method name
        return f"wint{self.bits}"

    def get_quant_method(self, layer: nn.Module, prefix: str) -> QuantMethod | None:
        if getattr(layer, "is_fused_moe", False):      # MoE experts: quant/moe_*.py
            return PrequantWeightOnlyMoEMethod(self.bits, self.is_permuted)
        return PrequantWeightOnlyLinearMethod(self.bits, shard_names_for(prefix, self.packed_modules),
                                              self.is_permuted)


def weight_only_config_from_checkpoint(config: dict, packed_modules: dict[str, tuple[str, ...]] | None,
                                       source: str) -> QuantConfig:
    """`quantization_config` {quantization: wint8|wint4, is_quantized, is_checkpoint_bf16,
    is_permuted} -> config.

    is_quantized false, or FastDeploy's `is_checkpoint_bf16` true (WINT8Config.from_config), means a
    float checkpoint quantized online, like `--quantization wint8`. is_permuted defaults to true,
    as FastDeploy (its dense layers always hold `weight_quantize`'s CUTLASS layout).
    """
    name = str(config.get("quantization", config.get("quant_method", ""))).lower()
    bits = {"wint8": 8, "wint4": 4}.get(name)
    if bits is None:
        raise ValueError(f"{source}: quantization_config.quantization {name!r} is not wint8 / wint4")
    is_permuted = read_is_permuted(config, source)
    flags = {key: config.get(key, default) for key, default in
             (("is_quantized", True), ("is_checkpoint_bf16", False))}
    for key, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"{source}: quantization_config.{key} must be true or false, got {value!r}")
    if not flags["is_quantized"] or flags["is_checkpoint_bf16"]:
        return WInt8Config() if bits == 8 else WInt4Config()
    return WeightOnlyCheckpointConfig(bits, packed_modules, is_permuted)
