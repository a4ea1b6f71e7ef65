"""msModelSlim ascendV1 (classic or v1 saver) -> NeutralCheckpoint.

The description is found and validated by the runtime's own reader (`quant/formats.py`). A W8A8
static layer's effective float bias is what vllm-ascend computes with:
deq_scale * (quant_bias + input_offset * sum_k W_q) (the float `bias` msModelSlim also writes is
already folded into quant_bias; it is checked against it, not used). Our `online_hadamard` key
(python -m calib --rotation hadamard) is carried as `NeutralCheckpoint.online_hadamard`.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ascend_llm.quant.formats import ONLINE_HADAMARD_KEY, detect_quant_format, norm_module_alias
from ascend_llm.quant.modelslim_weight_only import unpack_modelslim_int4
from ascend_llm.quant.w8a8 import decode_deq_scale
from calib.config import CalibError
from calib.convert.checkpoint_files import check_finite_positive, per_channel, read_config, read_tensors, take
from calib.convert.neutral import NeutralCheckpoint, QuantLinear

logger = logging.getLogger(__name__)

SCHEMES = {"W8A8": "int8_static", "W8A8_DYNAMIC": "int8_dynamic", "W8A16": "int8_weight_only",
           "W4A16": "int4_weight_only", "W8A8FP8_DYNAMIC": "fp8_dynamic", "WFP8AFP8_DYNAMIC": "fp8_dynamic"}
WEIGHT_ONLY = ("W8A16", "W4A16")
META_KEYS = frozenset({"model_quant_type", "version", "group_size", "metadata", "optional", ONLINE_HADAMARD_KEY})


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
    if ONLINE_HADAMARD_KEY in description:      # validated by the runtime's reader (formats.py)
        spec = description[ONLINE_HADAMARD_KEY]
        checkpoint.online_hadamard = {"block_size": spec["block_size"], "layers": list(spec["layers"])}
    for name, quant_type in sorted(description.items()):
        if name in META_KEYS or not name.endswith(".weight") or quant_type == "FLOAT":
            continue
        if norm_module_alias(name) is not None:      # an old saver's copy of a norm, not a Linear
            tensors.pop(name, None)
            tensors.pop(name[:-len("weight")] + "bias", None)
            continue
        module = name[:-len(".weight")]
        if quant_type in WEIGHT_ONLY:
            checkpoint.linears[module] = _read_weight_only(tensors, module, quant_type, group_size(description))
        else:
            checkpoint.linears[module] = _read_linear(tensors, module, SCHEMES[quant_type])
    checkpoint.floats = tensors
    return checkpoint


def group_size(description: dict) -> int:
    return int(description.get("group_size", 0) or 0)


def _refuse_unconvertible(description: dict, source: str) -> None:
    for name, value in description.items():
        if name in META_KEYS or name in ("kv_cache_type", "kv_quant_type"):
            continue
        if value == "C8":
            raise CalibError(f"{name}: C8 int8 KV-cache scales have no compressed-tensors counterpart "
                             f"that vLLM loads (its KV schemes are fp8); convert a checkpoint without them")
        if value not in SCHEMES and value != "FLOAT":
            raise CalibError(f"{name}: type {value!r} is not converted ({', '.join(SCHEMES)} or FLOAT)")
        if group_size(description) and value not in WEIGHT_ONLY + ("FLOAT",):
            raise CalibError(f"{name}: {value} with group_size {group_size(description)}: only W8A16 / "
                             f"W4A16 layers are converted per group")


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


def _read_weight_only(tensors: dict[str, torch.Tensor], module: str, quant_type: str,
                      group: int) -> QuantLinear:
    """W8A16 / W4A16, per channel or per group: codes, scale [n, G] and offsets that must be whole
    numbers (zero points) to have a compressed-tensors form."""
    stored = take(tensors, f"{module}.weight", quant_type)
    raw_scale = take(tensors, f"{module}.weight_scale", quant_type)
    offset = tensors.pop(f"{module}.weight_offset", None)
    if raw_scale.dim() != 2:
        raise CalibError(f"{module}.weight_scale: expected [n, groups], got {list(raw_scale.shape)}")
    n, groups = raw_scale.shape
    k = stored.shape[1] if quant_type == "W8A16" or group else 2 * stored.shape[1]
    if quant_type == "W4A16":
        try:
            codes = unpack_modelslim_int4(stored, n, k, bool(group))
        except ValueError as exc:
            raise CalibError(f"{module}.{exc}") from None
    else:
        codes = stored
    if tuple(codes.shape) != (n, k) or groups != (k // group if group else 1):
        raise CalibError(f"{module}: weight {list(stored.shape)} and weight_scale {list(raw_scale.shape)} "
                         f"do not fit {quant_type} with group_size {group}")
    scale = raw_scale.to(torch.float32) if group else raw_scale.reshape(n).to(torch.float32)
    check_finite_positive(scale, f"{module}.weight_scale")
    bias = tensors.pop(f"{module}.bias", None)
    zero = None
    if offset is not None and bool(offset.float().ne(0).any()):
        offset = offset.float().reshape(n, groups)
        if not bool((offset == offset.round()).all()) or bool(offset.abs().gt(127).any()):
            raise CalibError(f"{module}.weight_offset: not whole numbers in the int8 range, so not a "
                             f"zero point compressed-tensors can hold")
        zero = offset.to(torch.int8)
    return QuantLinear(SCHEMES[quant_type], codes.contiguous(), scale,
                       None if bias is None else bias.to(torch.float32), group_size=group,
                       weight_zero_point=zero)


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
