"""Pre-quantized FP8 checkpoints (config.json `quantization_config.quant_method: "fp8"`).

- AutoFP8 / vLLM per-tensor: `weight` e4m3 [n, k], `weight_scale` float32 scalar per Linear,
  with `activation_scheme: "static"` also `input_scale` float32 scalar. Fused layers (qkv_proj,
  gate_up_proj) get one scale per shard; after loading, as vLLM's `requantize_with_max_scale`,
  every shard is dequantized and re-quantized to the largest shard scale so the layer keeps one
  scalar, and the static input scale is the max over shards. `ignored_layers` (or, when that
  is absent or empty, `modules_to_not_convert`, as vLLM's Fp8Config.from_config) stay float:
  exact module names (vLLM's is_layer_skipped: `prefix in ignored_layers`), or `re:<regex>`
  matched (re.match) against the module name; a fused layer is ignored when all its shards are,
  and mixing is an error.
- DeepSeek-style blocks (`weight_block_size: [bn, bk]`): `weight` e4m3 [n, k] and
  `weight_scale_inv` float32 [ceil(n/bn), ceil(k/bk)] per shard (a dequant multiplier); activations
  are quantized dynamically per token per bk channels. Fused shards concatenate along n, so each
  shard's n must be a multiple of bn (a clear error otherwise); `activation_scheme` must be dynamic.
"""
from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn as nn

from ascend_llm.numerics import primitives as P
from ascend_llm.quant.base import QuantConfig, QuantMethod
from ascend_llm.quant.fp8 import bind_fp8_kernel, check_block_shards, run_fp8
from ascend_llm.quant.module_patterns import check_regex_entries
from ascend_llm.quant.moe_fp8 import BlockFp8MoEMethod
from ascend_llm.quant.param_loading import add_param, check_loaded, shard_names_for

ACTIVATION_SCHEMES = ("dynamic", "static")


class Fp8CheckpointLinearMethod(QuantMethod):
    """AutoFP8 per-tensor e4m3 weights; dynamic or static (fixed `input_scale`) activations."""

    def __init__(self, static: bool, shard_names: tuple[str, ...] = ()) -> None:
        self.static, self.shard_names = static, shard_names

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        shards = len(output_sizes)
        add_param(layer, "weight", (sum(output_sizes), input_size), P.FP8_DTYPE, out_dim=0, in_dim=1)
        add_param(layer, "weight_scale", (shards,), torch.float32, out_dim=None)       # [shards]
        if self.static:
            add_param(layer, "input_scale", (shards,), torch.float32, out_dim=None)    # [shards]
        layer.fp8_kernel, layer.act_dtype = None, params_dtype

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        names = ("weight", "weight_scale") + (("input_scale",) if self.static else ())
        check_loaded(layer, names, self.shard_names)
        scales = _positive(layer, "weight_scale")                                       # [shards]
        weight, scale = requantize_with_max_scale(layer.weight.data, scales, list(layer.output_sizes))
        layer.weight = nn.Parameter(weight, requires_grad=False)                        # [n, k] e4m3
        layer.weight_scale = nn.Parameter(scale, requires_grad=False)                   # 0-dim
        if self.static:
            input_scale = _positive(layer, "input_scale").max()
            layer.input_scale = nn.Parameter(input_scale, requires_grad=False)          # 0-dim
        bind_fp8_kernel(layer, "per_tensor_static" if self.static else "per_tensor", layer.act_dtype)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return run_fp8(layer, x, bias)


class BlockFp8CheckpointLinearMethod(QuantMethod):
    """DeepSeek block FP8: e4m3 weight and `weight_scale_inv` [NB, KB] from the checkpoint (a
    subclass may load the scales under another SCALE_NAME; the layer always holds weight_scale_inv)."""

    SCALE_NAME = "weight_scale_inv"

    def __init__(self, block_size: tuple[int, int], shard_names: tuple[str, ...] = ()) -> None:
        self.block_size, self.shard_names = block_size, shard_names

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        bn, bk = self.block_size
        if getattr(layer, "shards_input_dim", False) and layer.tp_size > 1 and input_size % bk:
            raise ValueError(f"{layer.prefix}: input size per rank {input_size} is not divisible by "
                             f"weight_block_size k={bk}")
        check_block_shards(layer, output_sizes, input_size, self.block_size)
        n = sum(output_sizes)
        nb = sum(P.num_blocks(size, bn) for size in output_sizes)
        add_param(layer, "weight", (n, input_size), P.FP8_DTYPE, out_dim=0, in_dim=1)
        add_param(layer, self.SCALE_NAME, (nb, P.num_blocks(input_size, bk)), torch.float32,
                  out_dim=0, out_block=bn, in_dim=1)
        layer.weight_block_size = self.block_size
        layer.fp8_kernel, layer.act_dtype = None, params_dtype

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        check_loaded(layer, ("weight", self.SCALE_NAME), self.shard_names)
        if self.SCALE_NAME != "weight_scale_inv":
            scale = getattr(layer, self.SCALE_NAME)
            delattr(layer, self.SCALE_NAME)
            layer.weight_scale_inv = scale
        _positive(layer, "weight_scale_inv")
        _rows_scales_for_partial_shards(layer, self.block_size)
        bind_fp8_kernel(layer, "block", layer.act_dtype)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return run_fp8(layer, x, bias)


def _rows_scales_for_partial_shards(layer: nn.Module, block_size: tuple[int, int]) -> None:
    """Fused shards whose n is not a multiple of bn (e.g. SmolLM2's k_proj, n=192) each have
    their own block grid, so row r's scale is no longer block r // bn of the stacked scales:
    expand every shard's block rows to one scale row per output row ([n, KB], block size
    (1, bk)), which every block kernel reads the same way."""
    bn, bk = block_size
    sizes = list(layer.output_sizes)
    if len(sizes) == 1 or not any(size % bn for size in sizes):
        return
    rows, block_start = [], 0
    scales = layer.weight_scale_inv.data                               # [sum NB_s, KB]
    for size in sizes:
        nb = P.num_blocks(size, bn)
        rows.append(scales[block_start:block_start + nb].repeat_interleave(bn, 0)[:size])
        block_start += nb
    layer.weight_scale_inv = nn.Parameter(torch.cat(rows), requires_grad=False)   # [n, KB]
    layer.weight_block_size = (1, bk)


def requantize_with_max_scale(weight: torch.Tensor, scales: torch.Tensor,
                              output_sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 [n, k] with one scale per fused shard -> (e4m3 [n, k], 0-dim scale = max of scales).

    Shards already at the max scale are kept bit for bit; the others are dequantized and
    re-quantized (one more e4m3 rounding), as vLLM does for fused per-tensor checkpoints.
    """
    max_scale = scales.max()
    out = weight.clone()
    start = 0
    for index, size in enumerate(output_sizes):
        if bool(scales[index] != max_scale):
            rows = weight[start:start + size].float() * (scales[index] / max_scale)
            out[start:start + size] = P.fp8_cast(rows)
        start += size
    return out, max_scale.to(torch.float32)


def _positive(layer: nn.Module, name: str) -> torch.Tensor:
    values = getattr(layer, name).data
    if not bool(torch.isfinite(values).all() and (values > 0).all()):
        raise ValueError(f"{layer.prefix}.{name}: must be finite and > 0, got {values.flatten()[:8].tolist()}")
    return values


class Fp8CheckpointConfig(QuantConfig):
    """`quant_method: fp8` checkpoints: AutoFP8 per-tensor, or DeepSeek blocks with weight_block_size."""

    def __init__(self, activation_scheme: str = "dynamic", ignored_layers: tuple[str, ...] = (),
                 weight_block_size: tuple[int, int] | None = None,
                 packed_modules: dict[str, tuple[str, ...]] | None = None) -> None:
        self.activation_scheme = activation_scheme
        self.ignored_layers = ignored_layers
        self.weight_block_size = weight_block_size
        self.packed_modules = dict(packed_modules or {})

    @classmethod
    def get_name(cls) -> str:
        return "fp8"

    @classmethod
    def from_config(cls, config: dict[str, Any], packed_modules: dict[str, tuple[str, ...]] | None = None,
                    source: str = "quantization_config") -> "Fp8CheckpointConfig":
        """Parse and validate a `quantization_config` dict (ValueError names `source` and field)."""
        scheme = config.get("activation_scheme")
        if scheme not in ACTIVATION_SCHEMES:
            raise ValueError(f"{source}: activation_scheme must be one of {ACTIVATION_SCHEMES}, got {scheme!r}")
        key, ignored = ignored_layers_entry(config)
        if not isinstance(ignored, list) or not all(isinstance(i, str) for i in ignored):
            raise ValueError(f"{source}: {key} must be a list of strings, got {ignored!r}")
        check_regex_entries(ignored, key, source)
        block = config.get("weight_block_size")
        if block is not None:
            if not (isinstance(block, list) and len(block) == 2
                    and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
                raise ValueError(f"{source}: weight_block_size must be two positive integers, got {block!r}")
            if scheme != "dynamic":
                raise ValueError(f"{source}: block-wise FP8 (weight_block_size {block}) needs "
                                 f"activation_scheme 'dynamic', got {scheme!r}")
            block = (block[0], block[1])
        return cls(scheme, tuple(ignored), block, packed_modules)

    def get_quant_method(self, layer: nn.Module, prefix: str) -> QuantMethod | None:
        if getattr(layer, "is_fused_moe", False):      # MoE experts: quant/moe_fp8.py
            if self.is_ignored(prefix):
                return None
            if self.weight_block_size is None:
                raise ValueError(f"{prefix}: per-tensor fp8 MoE expert checkpoints are not supported "
                                 f"(block-wise, weight_block_size, only)")
            return BlockFp8MoEMethod(self.weight_block_size, online=False)
        shard_names = shard_names_for(prefix, self.packed_modules)
        if self.is_ignored(prefix, shard_names):
            return None
        if self.weight_block_size is not None:
            return BlockFp8CheckpointLinearMethod(self.weight_block_size, shard_names)
        return Fp8CheckpointLinearMethod(self.activation_scheme == "static", shard_names)

    def is_ignored(self, prefix: str, shard_names: tuple[str, ...] = ()) -> bool:
        """Whether `prefix` (all its fused shards) is in ignored_layers; mixed shards are an error."""
        parent = prefix.rpartition(".")[0]
        names = [f"{parent}.{s}" if parent else s for s in shard_names] or [prefix]
        flags = {name: any(_matches(entry, name) for entry in self.ignored_layers) for name in names}
        if len(set(flags.values())) > 1:
            raise ValueError(f"{prefix}: ignored_layers covers only some fused shards {flags}; "
                             f"the shards of a fused layer must all be quantized or all float")
        return next(iter(flags.values()))


def ignored_layers_entry(config: dict[str, Any]) -> tuple[str, Any]:
    """(key, value) of the float-layer list, as vLLM's Fp8Config.from_config reads it:
    `ignored_layers`, or `modules_to_not_convert` when that is absent or empty."""
    ignored = config.get("ignored_layers")
    if ignored:
        return "ignored_layers", ignored
    fallback = config.get("modules_to_not_convert")
    if fallback:
        return "modules_to_not_convert", fallback
    return "ignored_layers", [] if ignored is None else ignored


def _matches(entry: str, name: str) -> bool:
    if entry.startswith("re:"):
        return re.match(entry[3:], name) is not None
    return entry == name
