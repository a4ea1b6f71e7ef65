"""NeutralCheckpoint -> msModelSlim ascendV1 (quant_model_description.json + quant_model_weights),
through the calibration exporter's writer so both produce the same layout (`calib/export.py`)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from calib.config import CalibError
from ascend_llm.numerics.primitives import pack_int4
from ascend_llm.quant.formats import ONLINE_HADAMARD_KEY
from calib.convert.neutral import NeutralCheckpoint, QuantLinear
from calib.export import VLLM_ASCEND_FP8_TYPE, deq_scale_is_int64, quant_description, write_checkpoint
from calib.quantize import static_scale_tensors

ASCEND_TYPES = {"int8_dynamic": "W8A8_DYNAMIC", "int8_static": "W8A8", "int8_weight_only": "W8A16",
                "int4_weight_only": "W4A16", "fp8_dynamic": VLLM_ASCEND_FP8_TYPE,
                "fp8_static": VLLM_ASCEND_FP8_TYPE}
# what writing a scheme as ascendV1 changes (the report lists it per layer)
ASCEND_CHANGES = {"fp8_static": "static per-tensor fp8 activations become dynamic per-token "
                                "(vllm-ascend has no static FP8; input_scale dropped)"}


def write_ascendv1(checkpoint: NeutralCheckpoint, dst: Path) -> dict[str, str]:
    """Write the weights, description and config.json into `dst`; returns module -> written type."""
    dtype = checkpoint.model_dtype()
    group = description_group_size(checkpoint)
    tensors: dict[str, torch.Tensor] = {}
    types: dict[str, str] = {}
    for name, tensor in checkpoint.floats.items():
        tensors[name], types[name] = tensor.contiguous(), "FLOAT"
    _add_tied_head(checkpoint, tensors, types)
    written = {}
    for module, linear in checkpoint.linears.items():
        quant_type = ASCEND_TYPES[linear.scheme]
        for leaf, value in linear_tensors(linear, deq_scale_is_int64(dtype), group).items():
            tensors[f"{module}.{leaf}"] = value.contiguous()
            types[f"{module}.{leaf}"] = "FLOAT" if leaf == "bias" else quant_type
        written[module] = quant_type
    description = quant_description(types, group)
    if checkpoint.online_hadamard:
        description[ONLINE_HADAMARD_KEY] = dict(checkpoint.online_hadamard)
    write_checkpoint(dst, dict(sorted(tensors.items())), description)
    (dst / "config.json").write_text(json.dumps(checkpoint.config, indent=2))
    return written


def description_group_size(checkpoint: NeutralCheckpoint) -> int:
    """The description's one `group_size`: that of the group-wise weight-only layers (0 if none).
    msModelSlim applies it to every quantized layer, so per-channel weight-only layers are written
    with their scales repeated per group (exact) and other schemes cannot sit beside it."""
    sizes = {linear.group_size for linear in checkpoint.linears.values() if linear.group_size}
    if len(sizes) > 1:
        raise CalibError(f"group sizes {sorted(sizes)}: an ascendV1 description holds one group_size")
    if not sizes:
        return 0
    others = sorted(m for m, linear in checkpoint.linears.items() if not linear.weight_only)
    if others:
        raise CalibError(f"{others[0]}: {checkpoint.linears[others[0]].scheme} cannot share an ascendV1 "
                         f"checkpoint with group-wise weight-only layers (group_size applies to all)")
    return sizes.pop()


def _add_tied_head(checkpoint: NeutralCheckpoint, tensors: dict, types: dict) -> None:
    """msModelSlim writes `lm_head.weight` (FLOAT) for tied models too: vllm-ascend looks it up."""
    embed = tensors.get("model.embed_tokens.weight")
    if "lm_head.weight" not in tensors and embed is not None and checkpoint.config.get("tie_word_embeddings"):
        tensors["lm_head.weight"], types["lm_head.weight"] = embed.clone(), "FLOAT"


def linear_tensors(linear: QuantLinear, deq_as_int64: bool, group_size: int = 0) -> dict[str, torch.Tensor]:
    """The ascendV1 tensors of one Linear (leaf -> tensor); `group_size` is the description's."""
    n = linear.weight.shape[0]
    if linear.weight_only:
        out = _weight_only_tensors(linear, group_size)
    elif linear.scheme == "int8_static":
        out = {"weight": linear.weight}
        out.update(static_scale_tensors(linear.weight, linear.weight_scale, linear.input_scale,
                                        float(linear.input_zero_point), linear.bias, deq_as_int64))
    else:
        out = {"weight": linear.weight,
               "weight_scale": linear.weight_scale.reshape(n, 1).clone(),              # [n, 1]
               "weight_offset": torch.zeros(n, 1, dtype=torch.float32)}              # symmetric
    if linear.bias is not None:
        out["bias"] = linear.bias.to(torch.float32)
    return out


def _weight_only_tensors(linear: QuantLinear, group_size: int) -> dict[str, torch.Tensor]:
    """W8A16 / W4A16 as msModelSlim's classic saver lays them out (complex_quantifier.py
    `_w4a16_pack_int4`): int4 pairs along n per group, along k per channel; scale and offset
    float32 [n, G] (G = k / group_size, or 1)."""
    n, k = linear.weight.shape
    if group_size:
        try:
            scale, zero = linear.group_scales(group_size)
        except ValueError as exc:
            raise CalibError(str(exc)) from None
    else:
        scale, zero = linear.weight_scale.reshape(n, 1), linear.weight_zero_point
    offset = torch.zeros_like(scale, dtype=torch.float32) if zero is None else zero.to(torch.float32)
    weight = linear.weight
    if linear.scheme == "int4_weight_only":
        if group_size and n % 2:
            raise CalibError(f"W4A16 per-group pairs output rows: n = {n} must be even")
        pairs = pack_int4(weight.t().contiguous()).t() if group_size else pack_int4(weight)
        weight = pairs.contiguous().view(torch.int8)                 # [n/2, k] or [n, k/2]
    return {"weight": weight, "weight_scale": scale.to(torch.float32).clone(),
            "weight_offset": offset.reshape(scale.shape).clone()}


def vllm_ascend_gap(linear: QuantLinear, group_size: int) -> str | None:
    """Why upstream vllm-ascend cannot load this layer as written (None if it can)."""
    if linear.scheme == "int4_weight_only":
        return ("W4A16: vllm-ascend registers no W4A16 linear scheme (only a MoE one, "
                "quantization/methods/w4a16.py); this runtime loads it")
    if linear.scheme == "int8_weight_only" and group_size:
        return ("W8A16 per group: vllm-ascend's W8A16 takes per-channel scales only "
                "(quantization/methods/w8a16.py, weight_scale [n, 1]); this runtime loads it")
    return None


def static_bias_rounding(linear: QuantLinear) -> float:
    """max |bias change| of folding the float bias into quant_bias (0 without a bias)."""
    if linear.bias is None or linear.scheme != "int8_static":
        return 0.0
    deq = (torch.tensor([linear.input_scale], dtype=torch.float32) * linear.weight_scale).double()
    folded = torch.round(linear.bias.double() / deq) * deq
    return float((folded - linear.bias.double()).abs().max())
