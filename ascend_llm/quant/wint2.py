"""FastDeploy `wint2` checkpoints: `quantization_config` parsing and the WINT2 linear method.

config.json `quantization_config` (FastDeploy's WINT2 doc, with the spellings its code reads):
    quantization: "wint2"
    dense_quant_type | dense_quant_config: "wint8" (default) or "wint4" -- dense Linear layers,
        pre-quantized (`quant_weight` + `weight_scale`, layout in quant/weight_only_layout.py)
    is_permuted: the layout of those wint8 / wint4 tensors (and of the w4 MoE experts); FastDeploy's
        default true = its CUTLASS layout (experts in it are refused), false = row-major
    moe_quant_type: "w4w2"
    moe_quant_config: {moe_w4_quant_config: {quant_type: wint4, quant_start_layer, quant_end_layer},
                       moe_w2_quant_config: {quant_type: wint2, quant_granularity, quant_group_size,
                                             quant_start_layer, quant_end_layer}}
MoE experts: `method_for_moe_layer` answers which range (wint4 or wint2) a layer is in and
quant/moe_weight_only.py runs it. Our extension (FastDeploy has no dense WINT2): `dense_wint2_modules`, a
list of module-name patterns ("mlp.gate_proj" matches any `...mlp.gate_proj`; "re:<regex>"
is matched against the full checkpoint module name), makes those dense layers WINT2 too;
`dense_wint4_modules` (same patterns) makes the dense layers it matches wint4 instead of
`dense_quant_type` (e.g. keep the first / last layers' down_proj out of WINT2 at 4 bits, like
FastDeploy's w4 layer range for MoE). WINT2 wins where both match.

WINT2 tensors per Linear, FastDeploy orientation, layout and decode: numerics/wint2.py.
Fused layers (gate_up_proj, qkv_proj) concatenate their shards along n (the last dim of the
[*, n] tensors, the only dim of the [n] ones).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ascend_llm.numerics import wint2 as L
from ascend_llm.quant.base import QuantConfig, QuantMethod
from ascend_llm.quant.module_patterns import check_regex_entries
from ascend_llm.quant.moe_weight_only import w4w2_method
from ascend_llm.quant.param_loading import add_param, check_loaded, shard_names_for
from ascend_llm.quant.weight_only import PrequantWeightOnlyLinearMethod, apply_weight_only, bind_weight_only_kernel
from ascend_llm.quant.weight_only_layout import read_is_permuted

DENSE_TYPES = {"wint8": 8, "wint4": 4}
WRITER_HINT = ("WINT2 is an offline format: convert a float checkpoint with "
               "`python -m calib.wint2.writer --model_path M --save_directory OUT`")


@dataclass(frozen=True, slots=True)
class LayerRange:
    """An inclusive decoder-layer range with the quant type used there."""
    quant_type: str
    start: int
    end: int

    def __contains__(self, layer_idx: int) -> bool:
        return self.start <= layer_idx <= self.end


class WInt2LinearMethod(QuantMethod):
    """Dense WINT2 Linear: five FastDeploy tensors, decoded to the model dtype at matmul time."""

    def __init__(self, shard_names: tuple[str, ...] = ()) -> None:
        self.shard_names = shard_names

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        shapes = L.expected_shapes(input_size, sum(output_sizes))
        add_param(layer, "quant_weight", shapes["quant_weight"], torch.uint8, out_dim=1, in_dim=0)
        add_param(layer, "weight_scale", shapes["weight_scale"], torch.uint8, out_dim=1, in_dim=0)
        add_param(layer, "super_scales", shapes["super_scales"], params_dtype, out_dim=0)
        add_param(layer, "code_scale", shapes["code_scale"], torch.float32, out_dim=0)
        add_param(layer, "code_zp", shapes["code_zp"], torch.float32, out_dim=0)
        if getattr(layer, "tp_size", 1) > 1 and input_size % (2 * L.GROUP_SIZE):
            raise ValueError(f"{layer.prefix}: WINT2 with tensor parallelism needs the per-rank "
                             f"input size ({input_size}) to be a multiple of {2 * L.GROUP_SIZE}")
        layer.quant_bits, layer.in_features_k = 2, input_size
        layer.weight_only_kernel, layer.act_dtype = None, params_dtype

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        check_loaded(layer, L.TENSOR_NAMES, self.shard_names)
        for name in ("super_scales", "code_scale", "code_zp"):
            if not bool(torch.isfinite(getattr(layer, name).data.float()).all()):
                raise ValueError(f"{layer.prefix}.{name}: must be finite")
        bind_weight_only_kernel(layer, 2, layer.act_dtype)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return apply_weight_only(layer, x, bias)


class WInt2Config(QuantConfig):
    """FastDeploy `wint2`: dense layers `dense_quant_type` (or WINT2 by `dense_wint2_modules`)."""

    def __init__(self, dense_quant_type: str = "wint8", moe_quant_type: str = "w4w2",
                 moe_ranges: tuple[LayerRange, ...] = (), dense_wint2_modules: tuple[str, ...] = (),
                 packed_modules: dict[str, tuple[str, ...]] | None = None,
                 dense_wint4_modules: tuple[str, ...] = (), is_permuted: bool = False) -> None:
        if dense_quant_type not in DENSE_TYPES:
            raise ValueError(f"dense_quant_type: {dense_quant_type!r} is not one of {sorted(DENSE_TYPES)}")
        self.dense_quant_type, self.moe_quant_type = dense_quant_type, moe_quant_type
        self.moe_ranges = moe_ranges
        self.dense_wint2_modules = dense_wint2_modules
        self.dense_wint4_modules = dense_wint4_modules
        self.packed_modules = dict(packed_modules or {})
        self.is_permuted = is_permuted        # parsed configs: FastDeploy's default, true

    @classmethod
    def get_name(cls) -> str:
        return "wint2"

    @classmethod
    def from_config(cls, config: dict[str, Any], packed_modules: dict[str, tuple[str, ...]] | None = None,
                    source: str = "quantization_config") -> "WInt2Config":
        """Parse a `quantization_config` dict; ValueError naming `source` and the field."""
        quantization = config.get("quantization", config.get("quant_method"))
        if str(quantization).lower() != "wint2":
            raise ValueError(f"{source}: quantization must be 'wint2', got {quantization!r}")
        dense = config.get("dense_quant_config", config.get("dense_quant_type", "wint8"))
        if not isinstance(dense, str) or dense.lower() not in DENSE_TYPES:
            raise ValueError(f"{source}: dense_quant_type {dense!r} is not one of {sorted(DENSE_TYPES)}")
        moe_type = config.get("moe_quant_type", "w4w2")
        if moe_type != "w4w2":
            raise ValueError(f"{source}: moe_quant_type {moe_type!r} is not supported (only 'w4w2')")
        modules, wint4 = (_patterns(config, key, source) for key in ("dense_wint2_modules", "dense_wint4_modules"))
        ranges = _moe_ranges(config.get("moe_quant_config", {}), source)
        return cls(dense.lower(), moe_type, ranges, modules, packed_modules, wint4,
                   read_is_permuted(config, source))

    def method_for_moe_layer(self, layer_idx: int) -> str:
        """'wint4' or 'wint2' for the MoE experts of decoder layer `layer_idx`."""
        for layer_range in self.moe_ranges:
            if layer_idx in layer_range:
                return layer_range.quant_type
        raise ValueError(f"moe_quant_config: layer {layer_idx} is in no w4 / w2 layer range "
                         f"({[(r.quant_type, r.start, r.end) for r in self.moe_ranges]})")

    def check_layer_coverage(self, num_layers: int, source: str = "quantization_config") -> None:
        """ValueError naming the first decoder layer of a `num_layers` model that no w4 / w2
        range covers (FastDeploy's defaults, w4 0..6 and w2 7.., cover every model)."""
        for layer_idx in range(num_layers if self.moe_ranges else 0):
            if not any(layer_idx in r for r in self.moe_ranges):
                ranges = [(r.quant_type, r.start, r.end) for r in self.moe_ranges]
                raise ValueError(f"{source}: moe_quant_config layer ranges {ranges} do not cover "
                                 f"layer {layer_idx} of the model's {num_layers} decoder layers")

    def get_quant_method(self, layer: nn.Module, prefix: str) -> QuantMethod | None:
        if getattr(layer, "is_fused_moe", False):      # MoE experts: quant/moe_*.py
            if layer.layer_idx is None:
                raise ValueError(f"{prefix}: w4w2 needs the decoder layer index of MoE layers")
            return w4w2_method(self.method_for_moe_layer(layer.layer_idx), self.is_permuted)
        shard_names = shard_names_for(prefix, self.packed_modules)
        if self.is_wint2_module(prefix, shard_names):
            return WInt2LinearMethod(shard_names)
        return PrequantWeightOnlyLinearMethod(self.dense_bits(prefix, shard_names), shard_names, self.is_permuted)

    def is_wint2_module(self, prefix: str, shard_names: tuple[str, ...] = ()) -> bool:
        """Whether the layer at `prefix` (all of its fused shards) matches `dense_wint2_modules`."""
        return self._fused_match(prefix, shard_names, self.dense_wint2_modules, "dense_wint2_modules")

    def dense_bits(self, prefix: str, shard_names: tuple[str, ...] = ()) -> int:
        """Weight bits of a non-WINT2 dense layer: 4 if `dense_wint4_modules` matches it, else
        those of `dense_quant_type`."""
        if self._fused_match(prefix, shard_names, self.dense_wint4_modules, "dense_wint4_modules"):
            return 4
        return DENSE_TYPES[self.dense_quant_type]

    def _fused_match(self, prefix: str, shard_names: tuple[str, ...], patterns: tuple[str, ...],
                     field: str) -> bool:
        parent = prefix.rpartition(".")[0]
        names = [f"{parent}.{s}" if parent else s for s in shard_names] or [prefix]
        matches = {name: self._matches(name, patterns) for name in names}
        if len(set(matches.values())) > 1:
            raise ValueError(f"{prefix}: {field} matches only some fused shards {matches}; "
                             f"the shards of a fused layer must share one type")
        return next(iter(matches.values()))

    @staticmethod
    def _matches(name: str, patterns: tuple[str, ...]) -> bool:
        for pattern in patterns:
            if pattern.startswith("re:"):
                if re.match(pattern[3:], name):
                    return True
            elif name == pattern or name.endswith("." + pattern):
                return True
        return False


def _patterns(config: dict[str, Any], key: str, source: str) -> tuple[str, ...]:
    """config[key]: a list of module-name patterns (module doc), checked; () if absent."""
    modules = config.get(key, [])
    if not isinstance(modules, list) or not all(isinstance(m, str) and m for m in modules):
        raise ValueError(f"{source}: {key} must be a list of non-empty strings, got {modules!r}")
    check_regex_entries(modules, key, source)
    return tuple(modules)


def _moe_ranges(moe_config: Any, source: str) -> tuple[LayerRange, ...]:
    """FastDeploy's w4 / w2 layer ranges (defaults: w4 layers 0..6, w2 from 7 on)."""
    if not isinstance(moe_config, dict):
        raise ValueError(f"{source}: moe_quant_config must be an object, got {type(moe_config).__name__}")
    w4 = moe_config.get("moe_w4_quant_config", {})
    w2 = moe_config.get("moe_w2_quant_config", {})
    ranges = (_range(w4, "wint4", 0, 6, f"{source}.moe_quant_config.moe_w4_quant_config"),
              _range(w2, "wint2", 7, 10 ** 9, f"{source}.moe_quant_config.moe_w2_quant_config"))
    if ranges[0].end >= ranges[1].start and ranges[1].end >= ranges[0].start:
        raise ValueError(f"{source}: moe w4 layers {ranges[0].start}..{ranges[0].end} overlap "
                         f"w2 layers {ranges[1].start}..{ranges[1].end}")
    return ranges


def _range(config: Any, default_type: str, start: int, end: int, source: str) -> LayerRange:
    if not isinstance(config, dict):
        raise ValueError(f"{source}: must be an object, got {type(config).__name__}")
    quant_type = config.get("quant_type", default_type)
    if quant_type != default_type:
        raise ValueError(f"{source}: quant_type must be {default_type!r}, got {quant_type!r}")
    start = config.get("quant_start_layer", start)
    end = config.get("quant_end_layer", end)
    for field, value in (("quant_start_layer", start), ("quant_end_layer", end)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{source}: {field} must be a non-negative integer, got {value!r}")
    if end < start:
        raise ValueError(f"{source}: quant_end_layer {end} < quant_start_layer {start}")
    return LayerRange(quant_type, start, end)
