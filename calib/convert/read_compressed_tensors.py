"""compressed-tensors (llm-compressor, HF hub) -> NeutralCheckpoint.

The config is validated by the runtime's own parser (`quant/compressed_tensors.py`), so a
checkpoint converts exactly when it would load here; each Linear's scheme is the config group
that targets it (`CompressedTensorsConfig.scheme_for`). A `transform_config` the runtime runs (online
"hadamard" input rotations, e.g. llm-compressor's SpinQuant R4) becomes our `online_hadamard`
(`transform_config.py`); anything else is refused by that parser, naming the scheme.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ascend_llm.quant.compressed_tensors import CompressedTensorsConfig, Scheme
from ascend_llm.quant.weight_only_group import unpack_int32
from calib.config import CalibError
from calib.convert.checkpoint_files import (check_finite_positive, linear_modules, per_channel,
                                            read_config, read_tensors, take)
from calib.convert.neutral import NeutralCheckpoint, QuantLinear
from calib.convert.transform_config import online_hadamard_from, pop_transform_tensors

QUANT_LEAVES = ("weight_scale", "weight_packed")


def read_compressed_tensors(src: Path) -> NeutralCheckpoint:
    """The checkpoint in `src` (config.json `quantization_config.quant_method: compressed-tensors`)."""
    config = read_config(src)
    quant = config.pop("quantization_config", None)
    if not isinstance(quant, dict) or quant.get("quant_method") != "compressed-tensors":
        raise CalibError(f"{src}/config.json: no compressed-tensors quantization_config "
                         f"(quant_method {None if not isinstance(quant, dict) else quant.get('quant_method')!r})")
    if quant.get("kv_cache_scheme") is not None:
        raise CalibError(f"{src}: kv_cache_scheme (fp8 KV-cache scales) has no ascendV1 counterpart "
                         f"(msModelSlim's C8 is int8 per channel); remove it to convert the weights alone")
    try:
        parsed = CompressedTensorsConfig.from_config(quant, None, f"{src}/config.json")
    except ValueError as exc:
        raise CalibError(str(exc)) from None
    tensors = read_tensors(src)
    pop_transform_tensors(tensors, parsed.transforms)
    checkpoint = NeutralCheckpoint(config)
    for module in linear_modules(tensors, QUANT_LEAVES):
        scheme = parsed.scheme_for(module)
        if scheme is None:
            raise CalibError(f"{module}: has quantized tensors but no config group targets it "
                             f"(or it is in ignore)")
        checkpoint.linears[module] = _read_linear(tensors, module, scheme)
    _check_unquantized_targets(tensors, parsed)
    leftovers = sorted(name for name in tensors if name.rpartition(".")[2] not in ("weight", "bias")
                       and _is_quant_tensor(name))
    if leftovers:
        raise CalibError(f"{leftovers[0]}: not read by any converted scheme ({len(leftovers)} such "
                         f"tensor(s)); e.g. activation-ordered weight_g_idx is not supported")
    checkpoint.floats = tensors
    checkpoint.online_hadamard = online_hadamard_from(parsed.transforms, _linears(checkpoint))
    return checkpoint


def _linears(checkpoint: NeutralCheckpoint) -> list[str]:
    """Every decoder Linear: the quantized ones and the float 2-D weights (not embeddings, lm_head)."""
    floats = [name.rpartition(".")[0] for name, t in checkpoint.floats.items()
              if name.endswith(".weight") and t.dim() == 2 and "embed" not in name and name != "lm_head.weight"]
    return sorted(set(checkpoint.linears) | set(floats))


def _check_unquantized_targets(tensors: dict[str, torch.Tensor], parsed: CompressedTensorsConfig) -> None:
    """A float Linear weight (2-D, not an embedding) that a config group targets lacks its scales."""
    for name, tensor in tensors.items():
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and tensor.dim() == 2 and "embed" not in module and parsed.scheme_for(module):
            raise CalibError(f"{module}: targeted by compressed-tensors config group "
                             f"{parsed.scheme_for(module).name!r} but has no weight_scale")


def _is_quant_tensor(name: str) -> bool:
    leaf = name.rpartition(".")[2]
    return leaf.startswith(("weight_", "input_", "output_")) or leaf in ("k_scale", "v_scale")


def _read_linear(tensors: dict[str, torch.Tensor], module: str, scheme: Scheme) -> QuantLinear:
    kind = scheme.kind()
    if kind == "fp8_block":
        raise CalibError(f"{module}: block-wise FP8 (config group {scheme.name!r}) is not converted: "
                         f"ascendV1 has no block scheme")
    bias = tensors.pop(f"{module}.bias", None)
    bias = None if bias is None else bias.to(torch.float32)
    if kind == "wna16":
        return _read_weight_only(tensors, module, scheme, bias)
    weight = take(tensors, f"{module}.weight", kind)
    n = weight.shape[0]
    scale = per_channel(take(tensors, f"{module}.weight_scale", kind), n, f"{module}.weight_scale")
    check_finite_positive(scale, f"{module}.weight_scale")
    if kind == "w8a8_int8_dynamic":
        return QuantLinear("int8_dynamic", weight, scale, bias)
    if kind == "w8a8_int8_static":
        return _read_static(tensors, module, weight, scale, bias)
    if kind == "fp8_channel_dynamic":
        return QuantLinear("fp8_dynamic", weight, scale, bias)
    if kind == "fp8_tensor_static":
        input_scale = take(tensors, f"{module}.input_scale", kind).reshape(-1).float()
        check_finite_positive(input_scale, f"{module}.input_scale")
        return QuantLinear("fp8_static", weight, scale, bias, float(input_scale[0]))
    return QuantLinear("fp8_dynamic", weight, scale, bias)          # fp8 tensor weights, dynamic activations


def _read_static(tensors: dict[str, torch.Tensor], module: str, weight: torch.Tensor,
                 scale: torch.Tensor, bias: torch.Tensor | None) -> QuantLinear:
    input_scale = take(tensors, f"{module}.input_scale", "static int8 activations").reshape(-1)
    zero = tensors.pop(f"{module}.input_zero_point", None)
    if input_scale.numel() != 1:
        raise CalibError(f"{module}.input_scale: per-tensor [1] expected, got {tuple(input_scale.shape)}")
    check_finite_positive(input_scale.float(), f"{module}.input_scale")
    zp = 0 if zero is None else zero.reshape(-1)
    if zero is not None and (zp.numel() != 1 or not -128 <= int(zp[0]) <= 127):
        raise CalibError(f"{module}.input_zero_point: one int8 value expected, got {zero.tolist()}")
    return QuantLinear("int8_static", weight, scale, bias, float(input_scale[0].float()),
                       0 if zero is None else int(zp[0]))


def _read_weight_only(tensors: dict[str, torch.Tensor], module: str, scheme: Scheme,
                      bias: torch.Tensor | None) -> QuantLinear:
    """pack-quantized int4 / int8, channel or group scales, symmetric or with zero points."""
    w = scheme.weights
    if w.strategy not in ("channel", "group"):
        raise CalibError(f"{module}: pack-quantized {w.num_bits}-bit {w.strategy} weights are not "
                         f"converted (channel or group only)")
    shape = take(tensors, f"{module}.weight_shape", "pack-quantized").tolist()
    packed = take(tensors, f"{module}.weight_packed", "pack-quantized")
    n, k = int(shape[0]), int(shape[1])
    codes = unpack_int32(packed, w.num_bits, k)                            # [n, k] int8
    if codes.shape[0] != n:
        raise CalibError(f"{module}.weight_packed: {tuple(packed.shape)} does not hold weight_shape {shape}")
    group_size = w.group_size if w.strategy == "group" else 0
    raw_scale = take(tensors, f"{module}.weight_scale", "pack-quantized")
    if group_size:
        groups = -(-k // group_size)
        if tuple(raw_scale.shape) != (n, groups):
            raise CalibError(f"{module}.weight_scale: expected [{n}, {groups}] (group size {group_size}), "
                             f"got {list(raw_scale.shape)}")
        scale = raw_scale.to(torch.float32)                                # [n, G]
    else:
        scale, groups = per_channel(raw_scale, n, f"{module}.weight_scale"), 1
    check_finite_positive(scale, f"{module}.weight_scale")
    zero = None
    if not w.symmetric:
        packed_zero = take(tensors, f"{module}.weight_zero_point", "asymmetric pack-quantized")
        zero = unpack_int32(packed_zero, w.num_bits, n, dim=0)             # [n, G] int8
        if tuple(zero.shape) != (n, groups):
            raise CalibError(f"{module}.weight_zero_point: {list(packed_zero.shape)} does not hold "
                             f"[{n}, {groups}] zero points")
        zero = zero if bool(zero.ne(0).any()) else None
    scheme_name = "int8_weight_only" if w.num_bits == 8 else "int4_weight_only"
    return QuantLinear(scheme_name, codes, scale, bias, group_size=group_size, weight_zero_point=zero)
