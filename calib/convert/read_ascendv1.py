"""msModelSlim ascendV1 (classic or v1 saver) -> NeutralCheckpoint.

The description is found and validated by the runtime's own reader (`quant/formats.py`). A W8A8
static layer's effective float bias is what vllm-ascend computes with:
deq_scale * (quant_bias + input_offset * sum_k W_q) (the float `bias` msModelSlim also writes is
already folded into quant_bias; it is checked against it, not used).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ascend_llm.quant.formats import detect_quant_format, norm_module_alias
from ascend_llm.quant.w8a8 import decode_deq_scale
from calib.config import CalibError
from calib.convert.checkpoint_files import check_finite_positive, per_channel, read_config, read_tensors, take
from calib.convert.neutral import NeutralCheckpoint, QuantLinear

logger = logging.getLogger(__name__)

SCHEMES = {"W8A8": "int8_static", "W8A8_DYNAMIC": "int8_dynamic", "W8A16": "int8_weight_only",
           "W8A8FP8_DYNAMIC": "fp8_dynamic", "WFP8AFP8_DYNAMIC": "fp8_dynamic"}
META_KEYS = frozenset({"model_quant_type", "version", "group_size", "metadata", "optional"})


def read_ascendv1(src: Path) -> NeutralCheckpoint:
    """The msModelSlim checkpoint in `src` (a quant_model_description*.json beside its weights)."""
    try:
        detected = detect_quant_format(src)
    except ValueError as exc:
        raise CalibError(str(exc)) from None
    if detected is None or detected["format"] != "ascend":
        raise CalibError(f"{src}: no quant_model_description*.json (not an msModelSlim checkpoint)")
    description = detected["description"]
    _refuse_unconvertible(description, detected["path"])
    config = read_config(src)
    config.pop("quantization_config", None)
    tensors = read_tensors(src)
    checkpoint = NeutralCheckpoint(config)
    for name, quant_type in sorted(description.items()):
        if name in META_KEYS or not name.endswith(".weight") or quant_type == "FLOAT":
            continue
        if norm_module_alias(name) is not None:      # an old saver's copy of a norm, not a Linear
            tensors.pop(name, None)
            tensors.pop(name[:-len("weight")] + "bias", None)
            continue
        module = name[:-len(".weight")]
        checkpoint.linears[module] = _read_linear(tensors, module, SCHEMES[quant_type])
    checkpoint.floats = tensors
    return checkpoint


def _refuse_unconvertible(description: dict, source: str) -> None:
    group_size = int(description.get("group_size", 0) or 0)
    if group_size:
        raise CalibError(f"{source}: group_size {group_size}: per-group scales are not converted")
    for name, value in description.items():
        if name in META_KEYS or name in ("kv_cache_type", "kv_quant_type"):
            continue
        if value == "C8":
            raise CalibError(f"{name}: C8 int8 KV-cache scales have no compressed-tensors counterpart "
                             f"that vLLM loads (its KV schemes are fp8); convert a checkpoint without them")
        if value not in SCHEMES and value != "FLOAT":
            raise CalibError(f"{name}: type {value!r} is not converted ({', '.join(SCHEMES)} or FLOAT)")


def _read_linear(tensors: dict[str, torch.Tensor], module: str, scheme: str) -> QuantLinear:
    weight = take(tensors, f"{module}.weight", scheme)
    n = weight.shape[0]
    bias = tensors.pop(f"{module}.bias", None)
    bias = None if bias is None else bias.to(torch.float32)
    if scheme == "int8_static":
        return _read_static(tensors, module, weight, bias)
    scale = per_channel(take(tensors, f"{module}.weight_scale", scheme), n, f"{module}.weight_scale")
    check_finite_positive(scale, f"{module}.weight_scale")
    offset = tensors.pop(f"{module}.weight_offset", None)
    if offset is not None and bool(offset.float().abs().max() > 0):
        raise CalibError(f"{module}.weight_offset: non-zero (asymmetric weights) has no symmetric "
                         f"compressed-tensors form here; only zero offsets convert")
    return QuantLinear(scheme, weight, scale, bias)


def _read_static(tensors: dict[str, torch.Tensor], module: str, weight: torch.Tensor,
                 float_bias: torch.Tensor | None) -> QuantLinear:
    n = weight.shape[0]
    input_scale = take(tensors, f"{module}.input_scale", "W8A8").float().reshape(-1)
    offset = take(tensors, f"{module}.input_offset", "W8A8").float().reshape(-1)
    deq = decode_deq_scale(take(tensors, f"{module}.deq_scale", "W8A8")).reshape(-1)       # [n]
    quant_bias = take(tensors, f"{module}.quant_bias", "W8A8").to(torch.float64).reshape(-1)
    if input_scale.numel() != 1 or offset.numel() != 1 or deq.numel() != n or quant_bias.numel() != n:
        raise CalibError(f"{module}: W8A8 expects input_scale / input_offset [1], deq_scale and "
                         f"quant_bias [{n}]")
    check_finite_positive(input_scale, f"{module}.input_scale")
    zp = float(offset[0])
    if zp != round(zp) or not -128 <= zp <= 127:
        raise CalibError(f"{module}.input_offset: {zp} is not an int8 zero point")
    classic_scale = tensors.pop(f"{module}.weight_scale", None)        # classic saver extras,
    tensors.pop(f"{module}.weight_offset", None)                        # checked by the runtime
    weight_scale = deq / input_scale[0] if classic_scale is None else per_channel(classic_scale, n, module)
    row_sums = weight.to(torch.float64).sum(dim=1)
    bias = (deq.double() * (quant_bias + zp * row_sums)).to(torch.float32)                 # [n]
    if float_bias is None and not bool(bias.abs().gt(0).any()):
        bias = None
    elif float_bias is None:
        logger.warning("%s: quant_bias carries a bias (an anti-outlier shift) the float "
                       "checkpoint has no tensor for; it is written as %s.bias", module, module)
    return QuantLinear("int8_static", weight, weight_scale.float(), bias, float(input_scale[0]), int(zp))
