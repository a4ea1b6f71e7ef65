"""compressed-tensors checkpoints (config.json `quantization_config.quant_method: "compressed-tensors"`),
the format llm-compressor writes and most quantized models on the HF hub use.

`quantization_config` fields read: `format` (top level, or per config group), `config_groups`
({name: {targets, weights, input_activations, output_activations, format}}), `ignore` (module
names or `re:` regexes), `kv_cache_scheme` (null, or fp8 static per-tensor: `self_attn.k_scale` /
`v_scale` for `--kv-cache-dtype fp8`), `quantization_status` (must be
"compressed" when given), `transform_config` (online input Hadamards of type "hadamard" with a
power-of-two head_dim, run by the `hadamard_transform` op like ascendV1's `online_hadamard`;
anything else refused naming the scheme: `compressed_tensors_transform.py`). Each
quantization-args dict holds num_bits, type (int | float),
strategy (tensor | channel | group | token | block), group_size, block_structure, symmetric,
dynamic, actorder (null, "static" or "weight": no `weight_g_idx`), plus observer settings that
only the calibration tool reads. An unknown key, format, strategy or combination is a ValueError
naming it.

Every scheme maps onto a method that already exists for another format (tensors per Linear):
- int8 channel weights, dynamic per-token int8 activations (`int-quantized`, preset W8A8):
  `weight` int8 [n, k], `weight_scale` [n, 1] -> msModelSlim's W8A8_DYNAMIC (`w8a8.py`; on the
  NPU `npu_dynamic_quant` + int8 matmul).
- int8 channel / tensor weights, static per-tensor int8 activations (`int-quantized`): also
  `input_scale` [1] (and `input_zero_point` [1] if asymmetric) -> msModelSlim's static W8A8 with
  deq_scale = input_scale * weight_scale and quant_bias = -zp * sum_k W (the float bias is added
  after the matmul instead of being folded into quant_bias).
- fp8 tensor weights with static per-tensor or dynamic activations (`float-quantized`, preset
  FP8): `weight` e4m3 [n, k], `weight_scale` [1], `input_scale` [1] -> the AutoFP8 checkpoint
  method (`fp8_checkpoint.py`; fused shards re-quantized to the max shard scale, as vLLM).
- fp8 channel weights, dynamic per-token activations (preset FP8_DYNAMIC): `weight` e4m3,
  `weight_scale` [n, 1] -> msModelSlim's WFP8AFP8_DYNAMIC (`w8a8.py`).
- fp8 block weights (`block_structure` [bn, bk]) with dynamic per-token-group (bk) activations
  (preset FP8_BLOCK): `weight` e4m3, `weight_scale` [ceil(n / bn), ceil(k / bk)] -> the DeepSeek
  block-FP8 method (`fp8_checkpoint.py`, which calls the same scales `weight_scale_inv`).
- int4 / int8 group or channel weights only (`pack-quantized`, W4A16 / W8A16, symmetric or
  with zero points): `weight_packed`, `weight_scale`, `weight_shape` (`weight_zero_point`) ->
  `weight_only_group.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ascend_llm.distributed.communication import splits_input
from ascend_llm.numerics import primitives as P
from ascend_llm.ops.collectives import all_reduce
from ascend_llm.quant.base import QuantConfig, QuantMethod
from ascend_llm.quant.config_fields import check_known_fields, check_object
from ascend_llm.quant.compressed_tensors_transform import (OnlineHadamard, add_transform_matrix,
                                                          parse_transform_config, transform_for)
from ascend_llm.quant.compressed_tensors_transform import name_matches as _matches
from ascend_llm.quant.fp8_checkpoint import BlockFp8CheckpointLinearMethod, Fp8CheckpointLinearMethod
from ascend_llm.quant.module_patterns import check_regex_entries
from ascend_llm.quant.param_loading import add_param, check_loaded, shard_names_for
from ascend_llm.quant.w8a8 import (W8A8DynamicLinearMethod, W8A8StaticLinearMethod,
                                   WFp8AFp8DynamicLinearMethod, encode_deq_scale_int64)
from ascend_llm.quant.weight_only_group import GroupWeightOnlyLinearMethod

METHOD = "compressed-tensors"
FORMATS = ("int-quantized", "float-quantized", "naive-quantized", "pack-quantized", "mixed-precision")
ARG_KEYS = frozenset({"num_bits", "type", "symmetric", "group_size", "strategy", "block_structure",
                      "dynamic", "actorder", "observer", "observer_kwargs", "scale_dtype", "zp_dtype"})
GROUP_KEYS = frozenset({"targets", "weights", "input_activations", "output_activations", "format"})
CONFIG_KEYS = frozenset({"quant_method", "format", "config_groups", "ignore", "kv_cache_scheme",
                         "quantization_status", "global_compression_ratio", "sparsity_config",
                         "transform_config", "version"})
STRATEGIES = ("tensor", "channel", "group", "token", "block")
# GPTQ activation orders that store contiguous groups in the original column order (no
# weight_g_idx): "static" / "weight" change only the order GPTQ quantized the columns in
ACTORDERS_WITHOUT_G_IDX = (None, "static", "weight")


@dataclass(frozen=True)
class QuantArgs:
    """One compressed-tensors QuantizationArgs (weights or input activations)."""
    num_bits: int
    type: str
    strategy: str
    symmetric: bool
    dynamic: bool
    group_size: int | None
    block_structure: tuple[int, int] | None = None       # strategy "block": (rows, cols) per block

    @classmethod
    def parse(cls, args: Any, where: str) -> "QuantArgs":
        check_object(args, ARG_KEYS, where)
        num_bits, qtype = args.get("num_bits", 8), args.get("type", "int")
        strategy, group_size = args.get("strategy"), args.get("group_size")
        symmetric, dynamic = args.get("symmetric", True), args.get("dynamic", False)
        if not isinstance(num_bits, int) or isinstance(num_bits, bool) or num_bits <= 0:
            raise ValueError(f"{where}.num_bits: must be a positive integer, got {num_bits!r}")
        if qtype not in ("int", "float"):
            raise ValueError(f"{where}.type: {qtype!r} is not supported (int, float)")
        if strategy is None:                    # compressed-tensors' default
            strategy = "group" if group_size else "tensor"
        if strategy not in STRATEGIES:
            raise ValueError(f"{where}.strategy: {strategy!r} is not supported ({', '.join(STRATEGIES)})")
        if strategy == "group":
            if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
                raise ValueError(f"{where}.group_size: strategy 'group' needs a positive integer, got {group_size!r}")
        elif group_size not in (None, -1):
            raise ValueError(f"{where}.group_size: {group_size!r} given with strategy {strategy!r}")
        if not isinstance(symmetric, bool):
            raise ValueError(f"{where}.symmetric: must be true or false, got {symmetric!r}")
        if dynamic not in (True, False):
            raise ValueError(f"{where}.dynamic: {dynamic!r} is not supported (true, false)")
        block = _block_structure(args.get("block_structure"), strategy, where)
        if args.get("actorder") not in ACTORDERS_WITHOUT_G_IDX:
            raise ValueError(f"{where}.actorder: {args['actorder']!r} (weight_g_idx column permutation) "
                             f"is not supported; null, 'static' or 'weight' only")
        return cls(num_bits, qtype, strategy, symmetric, bool(dynamic),
                   group_size if strategy == "group" else None, block)


def _block_structure(block: Any, strategy: str, where: str) -> tuple[int, int] | None:
    """`block_structure` [rows, cols]: required by strategy 'block', refused with any other."""
    if strategy != "block":
        if block is not None:
            raise ValueError(f"{where}.block_structure: {block!r} given with strategy {strategy!r}")
        return None
    if not (isinstance(block, list) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise ValueError(f"{where}.block_structure: strategy 'block' needs two positive integers, got {block!r}")
    return block[0], block[1]


@dataclass(frozen=True)
class Scheme:
    """A config group: which modules it targets and what it stores."""
    name: str
    targets: tuple[str, ...]
    weights: QuantArgs
    inputs: QuantArgs | None
    format: str

    def kind(self) -> str:
        """Which of the supported schemes this is; ValueError naming the group otherwise."""
        w, a, where = self.weights, self.inputs, f"config_groups.{self.name}"
        if self.format == "pack-quantized":
            if a is not None:
                raise ValueError(f"{where}: pack-quantized with input_activations is not supported")
            if w.type != "int" or w.num_bits not in (4, 8) or w.strategy not in ("group", "channel") or w.dynamic:
                raise ValueError(f"{where}.weights: pack-quantized supports static int4 / int8 group or "
                                 f"channel weights, got {_describe(w)}")
            return "wna16"
        if self.format in ("int-quantized", "naive-quantized") and w.type == "int":
            if a is None:
                raise ValueError(f"{where}: int weights without input_activations in format "
                                 f"{self.format!r} (unpacked weight-only) are not supported; "
                                 f"pack-quantized only")
            if w.num_bits != 8 or a.num_bits != 8 or a.type != "int" or not w.symmetric \
                    or w.strategy not in ("channel", "tensor") or w.dynamic:
                raise ValueError(f"{where}: int W8A8 needs symmetric static int8 channel or tensor weights "
                                 f"and int8 activations, got weights {_describe(w)}, "
                                 f"input_activations {_describe(a)}")
            if a.dynamic and a.strategy == "token" and a.symmetric:
                if w.strategy != "channel":
                    raise ValueError(f"{where}: dynamic per-token int8 activations need channel weights, "
                                     f"got {w.strategy!r}")
                return "w8a8_int8_dynamic"
            if not a.dynamic and a.strategy == "tensor":
                return "w8a8_int8_static"
            raise ValueError(f"{where}.input_activations: int8 {_describe(a)} is not supported "
                             f"(dynamic symmetric per-token, or static per-tensor)")
        if self.format in ("float-quantized", "naive-quantized") and w.type == "float":
            if w.num_bits != 8 or not w.symmetric or w.dynamic or w.strategy not in ("tensor", "channel", "block"):
                raise ValueError(f"{where}.weights: fp8 needs symmetric static 8-bit tensor, channel or "
                                 f"block weights, got {_describe(w)}")
            if a is None:
                raise ValueError(f"{where}: fp8 weights without input_activations (W8A16 fp8) are not "
                                 f"supported")
            if a.type != "float" or a.num_bits != 8 or not a.symmetric:
                raise ValueError(f"{where}.input_activations: fp8 weights need symmetric fp8 "
                                 f"activations, got {_describe(a)}")
            if w.strategy == "tensor" and not a.dynamic and a.strategy == "tensor":
                return "fp8_tensor_static"
            if w.strategy == "tensor" and a.dynamic and a.strategy in ("tensor", "token"):
                return "fp8_tensor_dynamic"
            if w.strategy == "channel" and a.dynamic and a.strategy == "token":
                return "fp8_channel_dynamic"
            if w.strategy == "block" and a.dynamic and a.strategy == "group" \
                    and a.group_size == w.block_structure[1]:
                return "fp8_block"
            raise ValueError(f"{where}: fp8 weights {w.strategy!r} with activations {_describe(a)} "
                             f"are not supported")
        raise ValueError(f"{where}: format {self.format!r} with {w.type} weights is not supported")


def _describe(args: QuantArgs) -> str:
    group = f", group_size {args.group_size}" if args.group_size else ""
    return (f"({args.num_bits}-bit {args.type}, {args.strategy}{group}, "
            f"{'symmetric' if args.symmetric else 'asymmetric'}, {'dynamic' if args.dynamic else 'static'})")


# ---------------------------------------------------------------------------------------------
# Methods: the existing ones, with compressed-tensors' tensor names
# ---------------------------------------------------------------------------------------------

class _CtChannelWeights:
    """Mixin: a `weight` of WEIGHT_DTYPE [n, k] with `weight_scale` [n, 1], named per fused shard."""

    WEIGHT_DTYPE: torch.dtype

    def __init__(self, shard_names: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.shard_names = shard_names

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        layer.params_dtype = params_dtype
        _add_channel_weight(layer, input_size, output_sizes, self.WEIGHT_DTYPE)


class CtW8A8DynamicMethod(_CtChannelWeights, W8A8DynamicLinearMethod):
    """int8 [n, k] + `weight_scale` [n, 1]; no offsets in the checkpoint (symmetric)."""

    WEIGHT_DTYPE = torch.int8

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        check_loaded(layer, ("weight", "weight_scale"), self.shard_names)
        layer.weight_offset = nn.Parameter(torch.zeros_like(layer.weight_scale.data), requires_grad=False)
        super().process_weights_after_loading(layer)


class CtW8A8StaticMethod(W8A8StaticLinearMethod):
    """int8 weights with channel ([n, 1]) or tensor ([1] per shard) scales, static per-tensor
    int8 activations (`input_scale`, `input_zero_point` if asymmetric), recast as msModelSlim's
    static W8A8: deq_scale[n] = input_scale * weight_scale[n], quant_bias[n] = -zp * sum_k W[n, k]."""

    def __init__(self, channel_weights: bool, symmetric_inputs: bool, shard_names: tuple[str, ...] = ()) -> None:
        self.channel, self.symmetric, self.shard_names = channel_weights, symmetric_inputs, shard_names

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        n, shards = sum(output_sizes), len(output_sizes)
        layer.params_dtype = params_dtype
        add_param(layer, "weight", (n, input_size), torch.int8, out_dim=0, in_dim=1)       # [n, k]
        if self.channel:
            add_param(layer, "weight_scale", (n, 1), torch.float32, out_dim=0)             # [n, 1]
        else:
            add_param(layer, "weight_scale", (shards,), torch.float32, out_dim=None)       # [shards]
        add_param(layer, "input_scale", (shards,), torch.float32, out_dim=None)            # [shards]
        if not self.symmetric:
            add_param(layer, "input_zero_point", (shards,), torch.float32, out_dim=None)   # [shards]
            layer.input_zero_point.load_check = _integer_values

    def _tensors(self) -> tuple[str, ...]:
        return ("weight", "weight_scale", "input_scale") + (() if self.symmetric else ("input_zero_point",))

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        check_loaded(layer, self._tensors(), self.shard_names)
        sizes = list(layer.output_sizes)
        rows = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))     # [n] shard of row
        w_scale = layer.weight_scale.data
        w_scale = w_scale.reshape(-1) if self.channel else w_scale[rows]                   # [n]
        in_scale = layer.input_scale.data                                                   # [shards]
        zero = (layer.input_zero_point.data if not self.symmetric
                else torch.zeros_like(in_scale))                                            # [shards]
        deq = (in_scale[rows] * w_scale).to(torch.float32)
        deq_dtype = torch.float32 if layer.params_dtype == torch.bfloat16 else torch.int64
        quant_bias = (-zero[rows].to(torch.int64) * _row_sums_over_k(layer)).to(torch.int32)
        if not self.symmetric:
            del layer.input_zero_point
        # msModelSlim's optional per-channel extras, consistent with deq_scale by construction
        layer.weight_scale = nn.Parameter(w_scale.to(torch.float32)[:, None], requires_grad=False)
        layer.weight_offset = nn.Parameter(torch.zeros(len(w_scale), 1), requires_grad=False)
        layer.input_offset = nn.Parameter(zero.to(torch.float32), requires_grad=False)
        layer.deq_scale = nn.Parameter(encode_deq_scale_int64(deq) if deq_dtype == torch.int64 else deq,
                                       requires_grad=False)
        layer.quant_bias = nn.Parameter(quant_bias, requires_grad=False)
        super().process_weights_after_loading(layer)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # msModelSlim folds its float bias into quant_bias; compressed-tensors keeps it separate
        out = super().apply(layer, x, None)
        return out if bias is None else out + bias.to(out.dtype)


class CtFp8ChannelDynamicMethod(_CtChannelWeights, WFp8AFp8DynamicLinearMethod):
    """e4m3 [n, k] + `weight_scale` [n, 1], dynamic per-token e4m3 activations."""

    WEIGHT_DTYPE = P.FP8_DTYPE

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        check_loaded(layer, ("weight", "weight_scale"), self.shard_names)
        super().process_weights_after_loading(layer)


class CtFp8BlockMethod(BlockFp8CheckpointLinearMethod):
    """FP8_BLOCK: e4m3 [n, k] + `weight_scale` [ceil(n / bn), ceil(k / bk)] (the dequant multiplier,
    DeepSeek's `weight_scale_inv` under compressed-tensors' name), dynamic per-token-group (bk)
    e4m3 activations: the block FP8 path of `fp8_checkpoint.py`."""

    SCALE_NAME = "weight_scale"


def _add_channel_weight(layer: nn.Module, input_size: int, output_sizes: list[int],
                        dtype: torch.dtype) -> None:
    """`weight` [n, k] of `dtype` and its per-channel float32 `weight_scale` [n, 1]."""
    n = sum(output_sizes)
    add_param(layer, "weight", (n, input_size), dtype, out_dim=0, in_dim=1)             # [n, k]
    add_param(layer, "weight_scale", (n, 1), torch.float32, out_dim=0)                  # [n, 1]


def _row_sums_over_k(layer: nn.Module) -> torch.Tensor:
    """sum_k W[n, k] over the WHOLE input dim [n] int64: quant_bias is added on one rank only
    (msModelSlim's convention), so a row-parallel rank adds up the other ranks' k slices too."""
    sums = layer.weight.data.to(torch.int32).sum(dim=1, dtype=torch.int32)              # [n], |.| <= 128 k
    if splits_input(layer):
        ops = getattr(layer, "ops", None)
        reduce = ops.get("all_reduce") if ops is not None else all_reduce
        sums = reduce(sums.clone(), layer.parallel, "sum")
    return sums.to(torch.int64)


def _integer_values(param: nn.Parameter, loaded: torch.Tensor, name: str) -> torch.Tensor:
    """An int8 zero point: integer values in [-128, 127] in any real dtype."""
    values = loaded.to(torch.float64)
    if loaded.dtype == torch.bool or not bool((values == values.round()).all()
                                              and (values >= -128).all() and (values <= 127).all()):
        raise ValueError(f"{name}: must hold integers in [-128, 127], got {loaded.flatten()[:8].tolist()}")
    return loaded.to(torch.float32)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

class CompressedTensorsConfig(QuantConfig):
    """A compressed-tensors checkpoint: each Linear gets the method of the config group targeting it."""

    def __init__(self, schemes: list[Scheme], ignore: tuple[str, ...],
                 packed_modules: dict[str, tuple[str, ...]] | None = None,
                 transforms: list[OnlineHadamard] | None = None) -> None:
        self.schemes, self.ignore = schemes, ignore
        self.packed_modules = dict(packed_modules or {})
        self.transforms = list(transforms or [])       # transform_config's online input Hadamards

    @classmethod
    def get_name(cls) -> str:
        return METHOD

    @classmethod
    def from_config(cls, config: dict[str, Any], packed_modules: dict[str, tuple[str, ...]] | None = None,
                    source: str = "quantization_config") -> "CompressedTensorsConfig":
        where = f"{source}: quantization_config"
        check_known_fields(config, CONFIG_KEYS, where)
        status = config.get("quantization_status", "compressed")
        if status != "compressed":
            raise ValueError(f"{where}.quantization_status: {status!r} is not supported (a checkpoint "
                             f"saved with save_compressed=True says 'compressed')")
        if config.get("kv_cache_scheme") is not None:
            _check_kv_cache_scheme(config["kv_cache_scheme"], f"{where}.kv_cache_scheme")
        if config.get("sparsity_config"):
            raise ValueError(f"{where}.sparsity_config: sparse compressed-tensors checkpoints are not supported")
        transforms = parse_transform_config(config.get("transform_config"), f"{where}.transform_config")
        top_format = config.get("format", "dense")
        if top_format not in FORMATS:
            raise ValueError(f"{where}.format: {top_format!r} is not supported ({', '.join(FORMATS)})")
        ignore = config.get("ignore") or []
        if not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore):
            raise ValueError(f"{where}.ignore: must be a list of strings, got {ignore!r}")
        check_regex_entries(ignore, "ignore", source)
        groups = config.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            raise ValueError(f"{where}.config_groups: must be a non-empty object, got {groups!r}")
        schemes = [_parse_group(name, group, top_format, f"{where}.config_groups.{name}")
                   for name, group in groups.items()]
        for scheme in schemes:          # refuse what cannot be run now, not at the first layer
            try:
                scheme.kind()
            except ValueError as exc:
                raise ValueError(f"{source}: {exc}") from None
        if "lm_head" not in ignore and not any(_matches(e, "lm_head") for e in ignore) and any(
                _matches(t, "lm_head") or t in ("Linear", "re:.*") for s in schemes for t in s.targets):
            raise ValueError(f"{where}.ignore: the LM head is quantized (not in ignore); quantized "
                             f"lm_head is not supported")
        rotated_head = [t.scheme for t in transforms if t.applies_to("lm_head")]
        if rotated_head:
            raise ValueError(f"{where}.transform_config: scheme {rotated_head[0]!r} rotates the input of "
                             f"lm_head online; not supported (ignore it, as llm-compressor's QuIP does)")
        return cls(schemes, tuple(ignore), packed_modules, transforms)

    def input_hadamard_block(self, prefix: str) -> int | None:
        transform = self.transform_for(prefix)
        return None if transform is None else transform.block_size

    def transform_for(self, prefix: str) -> OnlineHadamard | None:
        """The `transform_config` online input Hadamard of the layer at `prefix` (None if none)."""
        if not self.transforms:
            return None
        shard_names = shard_names_for(prefix, self.packed_modules)
        parent = prefix.rpartition(".")[0]
        names = [f"{parent}.{s}" if parent else s for s in shard_names] or [prefix]
        return transform_for(self.transforms, names, prefix)

    def get_quant_method(self, layer: nn.Module, prefix: str) -> QuantMethod | None:
        if getattr(layer, "is_fused_moe", False):
            raise ValueError(f"{prefix}: compressed-tensors MoE expert checkpoints are not supported")
        transform = self.transform_for(prefix)
        if transform is not None:          # its matrix tensor, if the checkpoint has one, loads here
            add_transform_matrix(layer, transform)
        shard_names = shard_names_for(prefix, self.packed_modules)
        parent = prefix.rpartition(".")[0]
        names = [f"{parent}.{s}" if parent else s for s in shard_names] or [prefix]
        found = {name: self.scheme_for(name) for name in names}
        if len({id(s) for s in found.values()}) > 1:
            labels = {n: (s.name if s else "float") for n, s in found.items()}
            raise ValueError(f"{prefix}: the fused shards have different compressed-tensors schemes "
                             f"{labels}; they must share one")
        scheme = next(iter(found.values()))
        if scheme is None:
            return None
        kind = scheme.kind()
        if kind == "w8a8_int8_dynamic":
            return CtW8A8DynamicMethod(shard_names)
        if kind == "w8a8_int8_static":
            return CtW8A8StaticMethod(scheme.weights.strategy == "channel", scheme.inputs.symmetric, shard_names)
        if kind in ("fp8_tensor_static", "fp8_tensor_dynamic"):
            return Fp8CheckpointLinearMethod(kind == "fp8_tensor_static", shard_names)
        if kind == "fp8_channel_dynamic":
            return CtFp8ChannelDynamicMethod(shard_names)
        if kind == "fp8_block":
            return CtFp8BlockMethod(scheme.weights.block_structure, shard_names)
        w = scheme.weights
        return GroupWeightOnlyLinearMethod(w.num_bits, w.group_size, w.symmetric, shard_names)

    def scheme_for(self, name: str) -> Scheme | None:
        """The scheme targeting module `name` (None if ignored or untargeted)."""
        if any(_matches(entry, name) for entry in self.ignore):
            return None
        hits = [s for s in self.schemes if any(t == "Linear" or _matches(t, name) for t in s.targets)]
        if not hits:
            return None
        # compressed-tensors: an exact or regex target wins over the "Linear" class target
        specific = [s for s in hits if any(t != "Linear" and _matches(t, name) for t in s.targets)]
        return (specific or hits)[0]


def _check_kv_cache_scheme(scheme: Any, where: str) -> None:
    """An fp8 per-tensor static KV-cache scheme: its `self_attn.k_scale` / `v_scale` tensors load
    through the KV-scale path (`layers.kv_scales`) and are used with `--kv-cache-dtype fp8`
    (ignored with `auto`, as vLLM). Anything else is refused naming the field."""
    args = QuantArgs.parse(scheme, where)
    if args.type != "float" or args.num_bits != 8 or args.strategy != "tensor" or args.dynamic \
            or not args.symmetric:
        raise ValueError(f"{where}: only an fp8 (8-bit float) static symmetric per-tensor KV-cache scheme "
                         f"is supported, got {_describe(args)}")


def _parse_group(name: str, group: Any, top_format: str, where: str) -> Scheme:
    check_object(group, GROUP_KEYS, where)
    targets = group.get("targets")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"{where}.targets: must be a non-empty list of strings, got {targets!r}")
    check_regex_entries(targets, "targets", where)
    if group.get("weights") is None:
        raise ValueError(f"{where}.weights: activation-only schemes are not supported")
    if group.get("output_activations") is not None:
        raise ValueError(f"{where}.output_activations: output quantization is not supported")
    weights = QuantArgs.parse(group["weights"], f"{where}.weights")
    inputs = group.get("input_activations")
    inputs = None if inputs is None else QuantArgs.parse(inputs, f"{where}.input_activations")
    fmt = group.get("format") or top_format
    if fmt not in FORMATS or fmt == "mixed-precision":
        raise ValueError(f"{where}.format: {fmt!r} is not supported "
                         f"({', '.join(f for f in FORMATS if f != 'mixed-precision')})")
    return Scheme(name, tuple(targets), weights, inputs, fmt)


