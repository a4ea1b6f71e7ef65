"""msModelSlim (ascendV1) W8A8 static, W8A8_DYNAMIC and W8A16 linear methods.

Checkpoint layout (msModelSlim's ascendV1 saver), per Linear: `weight` int8 [n, k] symmetric per
channel; W8A8 adds `input_scale` / `input_offset` [1] (asymmetric per-tensor activations),
`deq_scale` [n] = input_scale * weight_scale (int64 holding the float32 bits, or float32 for bf16
models) and `quant_bias` int32 [n]: y = (q_x @ q_W^T + quant_bias) * deq_scale. W8A8_DYNAMIC and
W8A16 carry `weight_scale` / `weight_offset` [n, 1]. The CPU reference
kernels of the NPU ops (`npu_quantize`, `npu_quant_matmul`, `npu_dynamic_quant`,
`npu_weight_quant_batchmatmul`) live in `ascend_llm/ops/cpu_int8.py` and are bound through the op
registry (`quantize_per_tensor`, `dynamic_quant_per_token`, `quant_matmul`).

Fused layers (qkv_proj, gate_up_proj): msModelSlim gives each of q/k/v (gate/up) its own
per-tensor `input_scale`/`input_offset`. We keep one (scale, offset) per shard ([num_shards]
parameters). After loading, adjacent shards with equal values are merged; in msModelSlim output
they are always equal (the shards see the same input tensor, so calibration gives the same
range), which leaves a single group = one activation quantization and one matmul, as on the NPU.
Unequal shards are still computed exactly as the unfused layers would: the activation is
quantized once per group and multiplied by that group's rows of the weight.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open

from ascend_llm.numerics import primitives as P
from ascend_llm.ops.cpu_int8 import (  # noqa: F401  (re-exported: the reference kernels)
    INT8_MAX, INT8_MIN, MAX_EXACT_K, dynamic_quant_matmul_reference, dynamic_quant_per_token_reference,
    int8_matmul_reference, quant_matmul_reference, quantize_per_tensor_reference,
    weight_only_matmul_reference)
from ascend_llm.ops.cpu_quant import fp8_per_token_matmul_reference as wfp8_dynamic_matmul_reference
from ascend_llm.quant.base import QuantConfig, QuantMethod
from ascend_llm.quant.formats import (DESCRIPTION_META_KEYS, ONLINE_HADAMARD_KEY, detect_quant_format,
                                      norm_module_alias, validate_description)
from ascend_llm.quant.moe_w8a8 import w8a8_moe_method
from ascend_llm.quant.modelslim_weight_only import ModelSlimWeightOnlyMethod

DEFAULT_PACKED_MODULES: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
SUPPORTED_LINEAR_TYPES = ("FLOAT", "W8A8", "W8A8_DYNAMIC", "W8A16", "W4A16", "WFP8AFP8_DYNAMIC",
                          "W8A8FP8_DYNAMIC")


# ---------------------------------------------------------------------------------------------
# deq_scale encoding
# ---------------------------------------------------------------------------------------------

def encode_deq_scale_int64(scale: torch.Tensor) -> torch.Tensor:
    """float32 scales [n] -> int64 [n] whose low 32 bits are the IEEE-754 float32 bits.

    Same as msModelSlim's `np.frombuffer(fp32.tobytes(), np.int32).astype(np.int64)`.
    """
    return scale.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)


def decode_deq_scale(deq_scale: torch.Tensor) -> torch.Tensor:
    """A checkpoint `deq_scale` (int64 float32-bits, or a float tensor) -> float32 values."""
    if deq_scale.dtype == torch.int64:
        low = deq_scale & 0xFFFFFFFF                               # the low 32 bits, unsigned
        low = torch.where(low >= 1 << 31, low - (1 << 32), low)     # as signed int32
        return low.to(torch.int32).view(torch.float32)
    if deq_scale.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return deq_scale.to(torch.float32)
    raise ValueError(f"deq_scale: unsupported dtype {deq_scale.dtype} (int64 or float expected)")


def _convert_deq_scale(loaded: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Re-express a checkpoint deq_scale in the parameter's dtype by value, never by a raw cast."""
    values = decode_deq_scale(loaded)
    return encode_deq_scale_int64(values) if dtype == torch.int64 else values.to(dtype)


# ---------------------------------------------------------------------------------------------
# Reference kernels (the NPU's arithmetic)
# ---------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

class AscendW8A8Config(QuantConfig):
    """msModelSlim ascendV1 checkpoint: the quant type of each layer comes from its description.

    `description` is the parsed `quant_model_description*.json`; `packed_modules` maps a fused
    layer name to its checkpoint shards (all shards must share one type).
    """

    def __init__(self, description: Mapping[str, Any],
                 packed_modules: Mapping[str, Sequence[str]] | None = None,
                 source: str = "quant description") -> None:
        validate_description(description, source)
        self.description = dict(description)
        self.packed_modules = {k: tuple(v) for k, v in (packed_modules or DEFAULT_PACKED_MODULES).items()}
        self.source = source

    @classmethod
    def get_name(cls) -> str:
        return "ascend"

    @classmethod
    def from_model_dir(cls, model_dir: str | Path,
                       packed_modules: Mapping[str, Sequence[str]] | None = None) -> "AscendW8A8Config":
        """Build from the description file in `model_dir`; ValueError if there is none."""
        found = detect_quant_format(model_dir)
        if found is None or found["format"] != "ascend":
            raise ValueError(f"{model_dir}: no msModelSlim quant_model_description*.json found")
        config = cls(found["description"], packed_modules, found["path"])
        check_description_tensors(config.description, checkpoint_tensor_names(model_dir), found["path"])
        return config

    @property
    def model_quant_type(self) -> str:
        return self.description["model_quant_type"]

    @property
    def group_size(self) -> int:
        return int(self.description.get("group_size", 0))

    def tensor_names(self) -> list[str]:
        """Every tensor name the description lists."""
        return [k for k in self.description if k not in DESCRIPTION_META_KEYS]

    def layer_quant_type(self, prefix: str) -> str:
        """The type of the layer at `prefix`, resolving fused layers through their shards."""
        key = f"{prefix}.weight"
        if key in self.description:
            return self.description[key]
        parent, _, name = prefix.rpartition(".")
        shards = self.packed_modules.get(name)
        if shards is None:
            raise ValueError(f"{prefix}: {key!r} is not in {self.source}")
        types = {}
        for shard in shards:
            shard_key = f"{parent}.{shard}.weight" if parent else f"{shard}.weight"
            if shard_key not in self.description:
                raise ValueError(f"{prefix}: shard {shard_key!r} is not in {self.source}")
            types[shard] = self.description[shard_key]
        if len(set(types.values())) != 1:
            raise ValueError(f"{prefix}: fused shards have different quant types {types}; "
                             f"all shards of a fused layer must share one")
        return next(iter(types.values()))

    def input_hadamard_block(self, prefix: str) -> int | None:
        """The `online_hadamard` block size when the description lists the layer at `prefix` (a
        fused layer: all of its shards, which share one input), else None."""
        if not self.hadamard_rotated_names(prefix):
            return None
        return int(self.description[ONLINE_HADAMARD_KEY]["block_size"])

    def online_hadamard_layers(self) -> list[str]:
        spec = self.description.get(ONLINE_HADAMARD_KEY)
        return list(spec["layers"]) if spec else []

    def hadamard_rotated_names(self, prefix: str) -> list[str]:
        listed = set(self.online_hadamard_layers())
        if not listed:
            return []
        parent, _, name = prefix.rpartition(".")
        shards = self.packed_modules.get(name, ()) if prefix not in listed else ()
        names = [f"{parent}.{s}" if parent else s for s in shards] or [prefix]
        rotated = [n for n in names if n in listed]
        if rotated and len(rotated) != len(names):
            raise ValueError(f"{self.source}: '{ONLINE_HADAMARD_KEY}' lists {rotated} but not "
                             f"{sorted(set(names) - set(rotated))}: the shards of fused {prefix} share "
                             f"one input, so all or none of them are rotated")
        return rotated

    def get_quant_method(self, layer: nn.Module, prefix: str) -> QuantMethod | None:
        if getattr(layer, "is_fused_moe", False):      # MoE experts: quant/moe_*.py
            spec = self.description.get(ONLINE_HADAMARD_KEY) or {"layers": []}
            inside = [n for n in spec["layers"] if n.startswith(f"{prefix}.")]
            if inside:
                raise ValueError(f"{self.source}: '{ONLINE_HADAMARD_KEY}' lists {inside[0]!r}, an expert "
                                 f"of fused MoE layer {prefix}: online rotation is supported on "
                                 f"Linear layers only")
            return w8a8_moe_method(self.description, prefix, layer.num_experts, self.source)
        quant_type = self.layer_quant_type(prefix)
        if quant_type == "FLOAT":
            return None
        if quant_type == "W8A8":
            method: _AscendLinearMethod = W8A8StaticLinearMethod()
        elif quant_type == "W8A8_DYNAMIC":
            method = W8A8DynamicLinearMethod(self.group_size, prefix)
        elif quant_type == "W8A16" and not self.group_size:
            method = W8A16LinearMethod(0, prefix)
        elif quant_type in ("W8A16", "W4A16"):        # int4 codes or group-wise scales
            method = ModelSlimWeightOnlyMethod(4 if quant_type == "W4A16" else 8, self.group_size, prefix)
        elif quant_type in FP8_DYNAMIC_TYPES:
            method = WFp8AFp8DynamicLinearMethod(self.group_size, prefix)
        else:
            raise ValueError(f"{prefix}: quant type {quant_type!r} is not supported for linear "
                             f"layers (supported: {', '.join(SUPPORTED_LINEAR_TYPES)})")
        method.checkpoint_bias = self.layer_has_bias(prefix)
        method.shard_names = self.packed_modules.get(prefix.rpartition(".")[2], ())
        return method

    def layer_has_bias(self, prefix: str) -> bool:
        """Whether the checkpoint holds a float `bias` for the layer (or any of its fused shards).

        Anti-outlier shifts add one even to Linears without a bias in the float model
        (per-token layers carry the compensation there; MindIE anti_outlier.md).
        """
        parent, _, name = prefix.rpartition(".")
        shards = self.packed_modules.get(name, ())
        keys = [f"{prefix}.bias"] + [f"{parent}.{s}.bias" if parent else f"{s}.bias" for s in shards]
        return any(key in self.description for key in keys)

    def norm_has_bias(self, prefix: str) -> bool:
        """Whether the norm at `prefix` has an anti-outlier `bias` in the checkpoint."""
        return f"{prefix}.bias" in self.description

    @property
    def any_norm_bias(self) -> bool:
        """Whether any `*norm.bias` is listed (vllm-ascend then gives every RMSNorm a zero bias)."""
        return any(name.endswith("norm.bias") for name in self.tensor_names())


# The tensors each linear quant type cannot load without (the description may list more).
REQUIRED_TENSORS: dict[str, tuple[str, ...]] = {
    "W8A8": ("weight", "input_scale", "input_offset", "deq_scale", "quant_bias"),
    "W8A8_DYNAMIC": ("weight", "weight_scale"),
    "W8A16": ("weight", "weight_scale"),
    "W4A16": ("weight", "weight_scale", "weight_offset"),
    "WFP8AFP8_DYNAMIC": ("weight", "weight_scale"),
    "W8A8FP8_DYNAMIC": ("weight", "weight_scale"),
}


def checkpoint_tensor_names(model_dir: str | Path) -> set[str]:
    """Names of every tensor in the `*.safetensors` files of `model_dir` (headers only)."""
    names: set[str] = set()
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            names.update(f.keys())
    return names


def check_description_tensors(description: Mapping[str, Any], names: set[str], source: str) -> None:
    """ValueError naming the first tensor the description lists (or its layer's quant type
    needs) that no weights file holds. Catches a scale silently left at its zero init."""
    for key, quant_type in description.items():
        if key in DESCRIPTION_META_KEYS:
            continue
        if key not in names:
            raise ValueError(f"{source}: lists tensor {key!r} ({quant_type}) but no *.safetensors "
                             f"file in the checkpoint holds it")
        module, _, leaf = key.rpartition(".")
        if norm_module_alias(key) is not None:     # a norm's copy, not a quantized layer
            continue
        for suffix in REQUIRED_TENSORS.get(quant_type, ()) if leaf == "weight" else ():
            if f"{module}.{suffix}" not in names:
                raise ValueError(f"{source}: {module} is {quant_type}, which needs tensor "
                                 f"'{module}.{suffix}'; the checkpoint has none")


# ---------------------------------------------------------------------------------------------
# Parameter creation and loading
# ---------------------------------------------------------------------------------------------

# `quant_kind` says how a parameter is laid out for the layer's loader (`layers.linear`):
#   "weight"    - [n, k]: rows per fused shard / TP rank, or k for row-parallel
#   "channel"   - per output channel ([n] or [n, 1]): rows like the weight, never split along dim 1
#   "deq_scale" - "channel", converted by value between int64 float-bits and float32
#   "tensor"    - one value per fused shard ([num_shards]); the checkpoint gives [1] per shard
_KIND_DIMS: dict[str, tuple[int | None, int | None]] = {        # kind -> (out_dim, in_dim)
    "weight": (0, 1), "channel": (0, None), "deq_scale": (0, None), "tensor": (None, None)}


def _add_param(layer: nn.Module, name: str, shape: tuple[int, ...], dtype: torch.dtype,
               kind: str, ignored_reason: str | None = None) -> None:
    """Register a zero-filled, frozen parameter tagged with its loading kind.

    `ignored_reason`: an optional checkpoint extra the kernel does not use; the model loader
    (`models.weight_utils`) does not require it and names the loaded ones once at INFO with it.
    """
    param = nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False)
    param.quant_kind, param.quant_name = kind, name
    param.out_dim, param.in_dim = _KIND_DIMS[kind]
    param.load_check = _checked_value
    if ignored_reason is not None:
        param.load_optional, param.ignored_reason = True, ignored_reason
    layer.register_parameter(name, param)


# msModelSlim's classic (v0) savers write weight_scale / weight_offset [n, 1] for W8A8 static
# layers too (its `quantized_weight_format.md` table; the v1 AscendV1Saver does not). The static
# kernel never reads them: deq_scale = input_scale * weight_scale is already in the checkpoint and
# the weights are symmetric. vllm-ascend likewise creates both parameters and leaves them unused
# (vllm_ascend/quantization/methods/w8a8_static.py, get_perchannel_param).
STATIC_EXTRAS_REASON = ("msModelSlim's classic saver writes weight_scale/weight_offset for W8A8 static "
                        "layers; the static kernel uses deq_scale and quant_bias (as vllm-ascend), so "
                        "they are only checked against deq_scale and dropped")


def _checked_value(param: nn.Parameter, loaded: torch.Tensor, name: str) -> torch.Tensor:
    """The checkpoint tensor after its dtype check (deq_scale re-encoded for the model dtype)."""
    _check_dtype(param, loaded, name)
    if param.quant_kind == "deq_scale":
        return _convert_deq_scale(loaded, param.dtype)
    return loaded


def _check_dtype(param: nn.Parameter, loaded: torch.Tensor, name: str) -> None:
    """ValueError naming the tensor when the checkpoint dtype cannot be loaded into `param` by
    value: integer tensors (weight, quant_bias) need their exact dtype, deq_scale int64 float-bits
    or float32 (re-encoded by value for the model dtype), float scales a float tensor, offsets any
    real dtype (their integrality is checked after loading)."""
    if param.quant_kind == "deq_scale":
        expected = "int64 (fp16 / fp32 models) or float32 (bf16 models)"
        ok = loaded.dtype in (torch.int64, torch.float32)
    elif not param.dtype.is_floating_point:
        expected, ok = str(param.dtype), loaded.dtype == param.dtype
    elif param.quant_name.endswith("offset"):
        expected, ok = "a float or integer tensor", loaded.dtype != torch.bool
    else:
        expected, ok = "a floating-point tensor", loaded.is_floating_point()
    if not ok:
        raise ValueError(f"{name}: checkpoint tensor has dtype {loaded.dtype}, expected {expected}")


def _adds_quant_bias(layer: nn.Module) -> bool:
    """quant_bias holds the zero-point correction over all of k: add it on one TP rank only."""
    return not (getattr(layer, "shards_input_dim", False) and getattr(layer, "tp_rank", 0) != 0)


def _flatten_x(x: torch.Tensor, k: int) -> torch.Tensor:
    """[..., k] -> [T, k]."""
    return x.reshape(-1, k)


# ---------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------

class _AscendLinearMethod(QuantMethod):
    """Base of the msModelSlim methods; `checkpoint_bias` says the checkpoint has a float bias
    for this layer (LinearBase must then create `bias` even if the float model has none)."""

    checkpoint_bias: bool = False
    shard_names: tuple[str, ...] = ()      # checkpoint module names of a fused layer's shards


class W8A8StaticLinearMethod(_AscendLinearMethod):
    """msModelSlim W8A8: int8 per-channel weights, static per-tensor asymmetric int8 activations.

    y[t, n] = ((sum_k q_x[t, k] * W[n, k]) + quant_bias[n]) * deq_scale[n], with
    q_x = clamp(round(x / input_scale + input_offset), -128, 127). The checkpoint's float `bias`
    (if any) is already folded into quant_bias, so `apply` ignores the layer bias, as the NPU path.
    """

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        n, shards = sum(output_sizes), len(output_sizes)
        deq_dtype = torch.float32 if params_dtype == torch.bfloat16 else torch.int64
        layer.params_dtype = params_dtype
        _add_param(layer, "weight", (n, input_size), torch.int8, "weight")          # [n, k]
        _add_param(layer, "input_scale", (shards,), torch.float32, "tensor")        # [shards]
        _add_param(layer, "input_offset", (shards,), torch.float32, "tensor")       # [shards]
        _add_param(layer, "deq_scale", (n,), deq_dtype, "deq_scale")                # [n]
        _add_param(layer, "quant_bias", (n,), torch.int32, "channel")               # [n]
        _add_param(layer, "weight_scale", (n, 1), torch.float32, "channel", STATIC_EXTRAS_REASON)
        _add_param(layer, "weight_offset", (n, 1), torch.float32, "channel", STATIC_EXTRAS_REASON)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        scale, offset = layer.input_scale.data, layer.input_offset.data
        if not bool(torch.isfinite(scale).all() and (scale > 0).all()):
            raise ValueError(f"{layer.prefix}.input_scale: must be finite and > 0, got {scale.tolist()}")
        if not bool((offset == offset.round()).all() and (offset >= INT8_MIN).all()
                    and (offset <= INT8_MAX).all()):
            raise ValueError(f"{layer.prefix}.input_offset: must be integers in [-128, 127], "
                             f"got {offset.tolist()}")
        layer.register_buffer("deq_scale_fp32", decode_deq_scale(layer.deq_scale.data), persistent=False)
        _check_and_drop_static_extras(layer, self.shard_names)
        layer.w8a8_groups = _activation_groups(list(layer.output_sizes), scale, offset)
        layer.w8a8_add_quant_bias = _adds_quant_bias(layer)
        _bind_layer_kernel(layer, "static")
        if layer.w8a8_layer_kernel is None:          # the per-op path (no whole-layer kernel here)
            layer.w8a8_quantize = _kernel(layer, "quantize_per_tensor", quantize_per_tensor_reference)
            layer.w8a8_matmul = _kernel(layer, "quant_matmul", quant_matmul_static)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if layer.w8a8_layer_kernel is not None:
            return layer.w8a8_layer_kernel.run(layer, x, bias)
        x2 = _flatten_x(x, layer.weight.shape[1])                                    # [T, k]
        quant_bias = layer.quant_bias if layer.w8a8_add_quant_bias else None
        outs = []
        for start, end, index in layer.w8a8_groups:
            q_x = layer.w8a8_quantize(x2, layer.input_scale[index], layer.input_offset[index])
            outs.append(layer.w8a8_matmul(
                q_x, layer.weight[start:end], layer.deq_scale_fp32[start:end],
                None if quant_bias is None else quant_bias[start:end], x.dtype))   # [T, end - start]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return out.reshape(*x.shape[:-1], out.shape[-1])


# deq_scale is input_scale * weight_scale rounded once to float32 (bit-exact in msModelSlim's
# output); 1 % also covers a weight_scale stored in bf16 (relative step 2^-8).
EXTRAS_RTOL = 1e-2


def _check_and_drop_static_extras(layer: nn.Module, shard_names: Sequence[str] = ()) -> None:
    """Check the optional weight_scale / weight_offset of a W8A8 static layer against the tensors
    the kernel uses (where the checkpoint had them), then remove both parameters.

    ValueError naming the tensor for a non-zero weight_offset (the int8 weight would not be
    symmetric, which y = (q_x @ W^T + quant_bias) * deq_scale assumes) or a weight_scale that
    disagrees with deq_scale / input_scale (a checkpoint put together from different runs).
    """
    loaded = getattr(layer, "loaded_shards", set())
    start = 0
    for index, size in enumerate(layer.output_sizes):
        rows = slice(start, start + size)
        start += size
        if ("weight_offset", index) in loaded and bool((layer.weight_offset.data[rows] != 0).any()):
            name = _shard_tensor_name(layer, index, "weight_offset", shard_names)
            raise ValueError(f"{name}: W8A8 static weights must be symmetric (all offsets 0)")
        if ("weight_scale", index) in loaded:
            want = layer.weight_scale.data[rows, 0].float() * layer.input_scale.data[index].float()
            got = layer.deq_scale_fp32[rows]
            if not torch.allclose(got, want, rtol=EXTRAS_RTOL, atol=0):
                worst = float(((got - want).abs() / want.abs().clamp_min(1e-30)).max())
                name = _shard_tensor_name(layer, index, "weight_scale", shard_names)
                raise ValueError(f"{name}: disagrees with deq_scale / input_scale (relative error "
                                 f"{worst:.3g}, tolerance {EXTRAS_RTOL}): deq_scale must equal "
                                 f"input_scale * weight_scale")
    del layer.weight_scale, layer.weight_offset


def _shard_tensor_name(layer: nn.Module, index: int, name: str, shard_names: Sequence[str]) -> str:
    """The checkpoint name of fused shard `index`'s tensor (q_proj.weight_scale for qkv_proj)."""
    if len(layer.output_sizes) > 1 and index < len(shard_names):
        return f"{layer.prefix.rpartition('.')[0]}.{shard_names[index]}.{name}"
    return f"{layer.prefix}.{name}" if len(layer.output_sizes) == 1 else f"{layer.prefix}.{name}[{index}]"


def quant_matmul_static(q_x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                        bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """quant_matmul without a registry (layers built without an op set)."""
    return quant_matmul_reference(q_x, weight, scale, bias, out_dtype)


def quant_matmul_dynamic(q_x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                         bias: torch.Tensor | None, out_dtype: torch.dtype,
                         pertoken_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The per-token form of quant_matmul without a registry."""
    return dynamic_quant_matmul_reference(q_x, weight, scale, pertoken_scale, bias, out_dtype)


def _kernel(layer: nn.Module, op: str, fallback: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """The backend's kernel for `op` (chosen once, after loading), or the reference without an op set."""
    ops = getattr(layer, "ops", None)
    return fallback if ops is None else ops.bind(layer, op).run


def _bind_layer_kernel(layer: nn.Module, scheme: str) -> None:
    """Bind the backend's whole-layer kernel (op `w8a8_linear`) when it has one.

    The NPU runs a layer as one torch_npu call sequence on weights its `prepare` re-lays out
    ([k, n], FRACTAL_NZ); backends without such a kernel use the per-op path of `apply`.
    """
    layer.w8a8_layer_kernel = None
    ops = getattr(layer, "ops", None)
    if ops is None or ("w8a8_linear", ops.backend) not in ops.registry.kernels:
        return
    kernel = ops.bind(layer, "w8a8_linear", scheme=scheme, dtype=layer.params_dtype)
    kernel.prepare(layer)
    layer.w8a8_layer_kernel = kernel


def _activation_groups(output_sizes: list[int], scale: torch.Tensor,
                       offset: torch.Tensor) -> tuple[tuple[int, int, int], ...]:
    """(row start, row end, shard index) runs of adjacent shards sharing (scale, offset)."""
    groups: list[list[int]] = []
    start = 0
    for index, size in enumerate(output_sizes):
        same = groups and bool(scale[groups[-1][2]] == scale[index]) \
            and bool(offset[groups[-1][2]] == offset[index])
        if same:
            groups[-1][1] = start + size
        else:
            groups.append([start, start + size, index])
        start += size
    return tuple((a, b, i) for a, b, i in groups)


class _PerChannelScaleMethod(_AscendLinearMethod):
    """Shared part of W8A8_DYNAMIC and W8A16: int8 weight [n, k], weight_scale/offset [n, 1]."""

    def __init__(self, group_size: int = 0, prefix: str = "") -> None:
        if group_size:
            raise ValueError(f"{prefix}: per-group scales (group_size={group_size}) are not "
                             f"supported; per-channel only")

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        n = sum(output_sizes)
        layer.params_dtype = params_dtype
        _add_param(layer, "weight", (n, input_size), torch.int8, "weight")          # [n, k]
        _add_param(layer, "weight_scale", (n, 1), torch.float32, "channel")         # [n, 1]
        _add_param(layer, "weight_offset", (n, 1), torch.float32, "channel")        # [n, 1]

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        scale = layer.weight_scale.data
        if not bool(torch.isfinite(scale).all() and (scale >= 0).all()):
            raise ValueError(f"{layer.prefix}.weight_scale: must be finite and >= 0")
        layer.register_buffer("weight_scale_fp32", scale.reshape(-1).to(torch.float32), persistent=False)
        layer.register_buffer("weight_offset_fp32", layer.weight_offset.data.reshape(-1).to(torch.float32),
                              persistent=False)


class W8A8DynamicLinearMethod(_PerChannelScaleMethod):
    """W8A8_DYNAMIC: int8 per-channel symmetric weights, per-token symmetric int8 activations.

    y[t, n] = (sum_k q_x[t, k] * W[n, k]) * weight_scale[n] * token_scale[t] + bias[n], with
    token_scale = rowmax|x| / 127: the deployed semantics (vllm-ascend's w8a8_dynamic method runs
    npu_dynamic_quant, then npu_quant_matmul with pertoken_scale and the float bias). msModelSlim's
    own fake-quant model simulates these activations asymmetrically (zero point per token), so its
    logits differ from any deployment by that much (tests/quant/test_peer_msmodelslim.py).
    """

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        super().process_weights_after_loading(layer)
        if bool((layer.weight_offset_fp32 != 0).any()):
            raise ValueError(f"{layer.prefix}.weight_offset: W8A8_DYNAMIC weights must be "
                             f"symmetric (all offsets 0)")
        _bind_layer_kernel(layer, "dynamic")
        if layer.w8a8_layer_kernel is None:          # the per-op path (no whole-layer kernel here)
            layer.w8a8_quantize = _kernel(layer, "dynamic_quant_per_token", dynamic_quant_per_token_reference)
            layer.w8a8_matmul = _kernel(layer, "quant_matmul", quant_matmul_dynamic)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if layer.w8a8_layer_kernel is not None:
            return layer.w8a8_layer_kernel.run(layer, x, bias)
        x2 = _flatten_x(x, layer.weight.shape[1])                                    # [T, k]
        q_x, token_scale = layer.w8a8_quantize(x2)                                   # [T, k], [T]
        out = layer.w8a8_matmul(q_x, layer.weight, layer.weight_scale_fp32, bias, x.dtype,
                                pertoken_scale=token_scale)                          # [T, n]
        return out.reshape(*x.shape[:-1], out.shape[-1])


class W8A16LinearMethod(_PerChannelScaleMethod):
    """W8A16: int8 weights dequantized as (W - weight_offset) * weight_scale; float activations."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        super().process_weights_after_loading(layer)
        _bind_layer_kernel(layer, "w8a16")

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if layer.w8a8_layer_kernel is not None:
            return layer.w8a8_layer_kernel.run(layer, x, bias)
        return weight_only_matmul_reference(x, layer.weight, layer.weight_scale_fp32,
                                            layer.weight_offset_fp32, bias)


# msModelSlim names its FP8-weight, FP8-per-token-activation layers WFP8AFP8_DYNAMIC; vllm-ascend
# registers the same scheme as W8A8FP8_DYNAMIC (vllm_ascend/quantization/methods/w8a8fp8_dynamic.py),
# with a `weight_offset` [n, 1] beside weight and weight_scale. Both names load here.
FP8_DYNAMIC_TYPES = ("WFP8AFP8_DYNAMIC", "W8A8FP8_DYNAMIC")
FP8_OFFSET_REASON = ("msModelSlim / vllm-ascend write a weight_offset for FP8 dynamic layers; the "
                     "weights are symmetric, so it is checked to be zero and dropped")


class WFp8AFp8DynamicLinearMethod(_AscendLinearMethod):
    """WFP8AFP8_DYNAMIC / W8A8FP8_DYNAMIC (MoFQ's FP8 layers): float8_e4m3fn weight [n, k] with a
    float32 per-channel `weight_scale` [n, 1] (and an optional all-zero `weight_offset` [n, 1]);
    activations e4m3 per token, computed at every call.

    y[t, n] = (sum_k q_x[t, k] * W[n, k]) * token_scale[t] * weight_scale[n] + bias[n], with
    token_scale = max(rowmax|x| / 448, 1 / (448 * 512)) (primitives.quantize_fp8_per_token_group).
    """

    def __init__(self, group_size: int = 0, prefix: str = "") -> None:
        if group_size:
            raise ValueError(f"{prefix}: per-group scales (group_size={group_size}) are not "
                             f"supported for WFP8AFP8_DYNAMIC; per-channel only")

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        n = sum(output_sizes)
        layer.params_dtype = params_dtype
        _add_param(layer, "weight", (n, input_size), P.FP8_DTYPE, "weight")         # [n, k] e4m3
        _add_param(layer, "weight_scale", (n, 1), torch.float32, "channel")         # [n, 1]
        _add_param(layer, "weight_offset", (n, 1), torch.float32, "channel", FP8_OFFSET_REASON)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        offset = getattr(layer, "weight_offset", None)
        if offset is not None:
            if bool((offset.data != 0).any()):
                raise ValueError(f"{layer.prefix}.weight_offset: FP8 dynamic weights must be "
                                 f"symmetric (all offsets 0)")
            del layer.weight_offset
        scale = layer.weight_scale.data
        if not bool(torch.isfinite(scale).all() and (scale >= 0).all()):
            raise ValueError(f"{layer.prefix}.weight_scale: must be finite and >= 0")
        if layer.weight.dtype != P.FP8_DTYPE:
            raise ValueError(f"{layer.prefix}.weight: WFP8AFP8_DYNAMIC needs float8_e4m3fn, "
                             f"got {layer.weight.dtype}")
        layer.register_buffer("weight_scale_fp32", scale.reshape(-1).to(torch.float32), persistent=False)
        _bind_per_token_fp8(layer)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        kernel = getattr(layer, "fp8_kernel", None)
        if kernel is not None:
            return kernel.run(layer, x, bias)
        x2 = _flatten_x(x, layer.weight.shape[1])                                    # [T, k]
        out = wfp8_dynamic_matmul_reference(x2, layer.weight, layer.weight_scale_fp32, bias)
        return out.reshape(*x.shape[:-1], out.shape[-1]).to(x.dtype)


def _bind_per_token_fp8(layer: nn.Module) -> None:
    """The backend's `fp8_matmul` kernel of scheme "per_token" (row-wise fp8), prepared; None for a
    bare layer (no op set), which runs the reference."""
    layer.fp8_kernel = None
    ops = getattr(layer, "ops", None)
    if ops is None:
        return
    kernel = ops.bind(layer, "fp8_matmul", scheme="per_token", dtype=getattr(layer, "params_dtype", None))
    kernel.prepare(layer)
    layer.fp8_kernel = kernel
