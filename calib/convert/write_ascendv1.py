"""NeutralCheckpoint -> msModelSlim ascendV1 (quant_model_description.json + quant_model_weights),
through the calibration exporter's writer so both produce the same layout (`calib/export.py`)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from calib.config import CalibError
from calib.convert.neutral import NeutralCheckpoint, QuantLinear
from calib.export import VLLM_ASCEND_FP8_TYPE, deq_scale_is_int64, quant_description, write_checkpoint
from calib.quantize import static_scale_tensors

ASCEND_TYPES = {"int8_dynamic": "W8A8_DYNAMIC", "int8_static": "W8A8", "int8_weight_only": "W8A16",
                "fp8_dynamic": VLLM_ASCEND_FP8_TYPE, "fp8_static": VLLM_ASCEND_FP8_TYPE}
# what writing a scheme as ascendV1 changes (the report lists it per layer)
ASCEND_CHANGES = {"fp8_static": "static per-tensor fp8 activations become dynamic per-token "
                                "(vllm-ascend has no static FP8; input_scale dropped)"}


def write_ascendv1(checkpoint: NeutralCheckpoint, dst: Path) -> dict[str, str]:
    """Write the weights, description and config.json into `dst`; returns module -> written type."""
    dtype = checkpoint.model_dtype()
    tensors: dict[str, torch.Tensor] = {}
    types: dict[str, str] = {}
    for name, tensor in checkpoint.floats.items():
        tensors[name], types[name] = tensor.contiguous(), "FLOAT"
    _add_tied_head(checkpoint, tensors, types)
    written = {}
    for module, linear in checkpoint.linears.items():
        quant_type = ASCEND_TYPES.get(linear.scheme)
        if quant_type is None:
            raise CalibError(f"{module}: {linear.scheme} has no ascendV1 type this runtime or "
                             f"vllm-ascend's W8A16 reads (per-channel int4 weight-only); convert it "
                             f"to compressed-tensors instead")
        for leaf, value in linear_tensors(linear, deq_scale_is_int64(dtype)).items():
            tensors[f"{module}.{leaf}"] = value.contiguous()
            types[f"{module}.{leaf}"] = "FLOAT" if leaf == "bias" else quant_type
        written[module] = quant_type
    write_checkpoint(dst, dict(sorted(tensors.items())), quant_description(types))
    (dst / "config.json").write_text(json.dumps(checkpoint.config, indent=2))
    return written


def _add_tied_head(checkpoint: NeutralCheckpoint, tensors: dict, types: dict) -> None:
    """msModelSlim writes `lm_head.weight` (FLOAT) for tied models too: vllm-ascend looks it up."""
    embed = tensors.get("model.embed_tokens.weight")
    if "lm_head.weight" not in tensors and embed is not None and checkpoint.config.get("tie_word_embeddings"):
        tensors["lm_head.weight"], types["lm_head.weight"] = embed.clone(), "FLOAT"


def linear_tensors(linear: QuantLinear, deq_as_int64: bool) -> dict[str, torch.Tensor]:
    """The ascendV1 tensors of one Linear (leaf -> tensor)."""
    n = linear.weight.shape[0]
    out: dict[str, torch.Tensor] = {"weight": linear.weight}
    if linear.scheme == "int8_static":
        out.update(static_scale_tensors(linear.weight, linear.weight_scale, linear.input_scale,
                                        float(linear.input_zero_point), linear.bias, deq_as_int64))
    else:
        out["weight_scale"] = linear.weight_scale.reshape(n, 1).clone()             # [n, 1]
        out["weight_offset"] = torch.zeros(n, 1, dtype=torch.float32)             # symmetric
    if linear.bias is not None:
        out["bias"] = linear.bias.to(torch.float32)
    return out


def static_bias_rounding(linear: QuantLinear) -> float:
    """max |bias change| of folding the float bias into quant_bias (0 without a bias)."""
    if linear.bias is None or linear.scheme != "int8_static":
        return 0.0
    deq = (torch.tensor([linear.input_scale], dtype=torch.float32) * linear.weight_scale).double()
    folded = torch.round(linear.bias.double() / deq) * deq
    return float((folded - linear.bias.double()).abs().max())
