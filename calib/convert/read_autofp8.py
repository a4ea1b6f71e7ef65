"""AutoFP8 / vLLM `quant_method: fp8` checkpoints (e4m3 per-tensor `weight` + `weight_scale`, static
`input_scale` or dynamic activations) -> NeutralCheckpoint.

The config is validated by the runtime's parser (`quant/fp8_checkpoint.py`, `ignored_layers` /
`modules_to_not_convert` included). Static activations stay static (fp8_static: lossless to
compressed-tensors); dynamic ones, per-tensor in vLLM's fp8 method, are written per-token (the
only dynamic fp8 activation scheme of vllm-ascend and of compressed-tensors' FP8_DYNAMIC), noted
per layer. Block-wise checkpoints (`weight_block_size`) are refused.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ascend_llm.numerics import primitives as P
from ascend_llm.quant.fp8_checkpoint import Fp8CheckpointConfig
from calib.config import CalibError
from calib.convert.checkpoint_files import check_finite_positive, linear_modules, per_channel, read_config, read_tensors, take
from calib.convert.neutral import NeutralCheckpoint, QuantLinear

DYNAMIC_NOTE = "dynamic per-tensor fp8 activations (vLLM's fp8 method) become dynamic per-token"


def read_autofp8(src: Path) -> NeutralCheckpoint:
    """The fp8 checkpoint in `src` (config.json `quantization_config.quant_method: fp8`)."""
    source = f"{src}/config.json"
    config = read_config(src)
    quant = config.pop("quantization_config", None)
    if not isinstance(quant, dict) or str(quant.get("quant_method", "")).lower() != "fp8":
        raise CalibError(f"{source}: no quantization_config with quant_method 'fp8'")
    try:
        parsed = Fp8CheckpointConfig.from_config(quant, None, source)
    except ValueError as exc:
        raise CalibError(str(exc)) from None
    if parsed.weight_block_size is not None:
        raise CalibError(f"{source}: block-wise FP8 (weight_block_size {list(parsed.weight_block_size)}) "
                         f"is not converted: neither ascendV1 nor this converter's compressed-tensors "
                         f"output has a block scheme")
    tensors = read_tensors(src)
    checkpoint = NeutralCheckpoint(config)
    for module in linear_modules(tensors, ("weight_scale",)):
        if parsed.is_ignored(module):
            raise CalibError(f"{module}: has fp8 scales but ignored_layers lists it")
        checkpoint.linears[module] = _read_linear(tensors, module, parsed.activation_scheme)
        if parsed.activation_scheme == "dynamic":
            checkpoint.notes[module] = DYNAMIC_NOTE
    checkpoint.floats = tensors
    return checkpoint


def _read_linear(tensors: dict[str, torch.Tensor], module: str, activation_scheme: str) -> QuantLinear:
    weight = take(tensors, f"{module}.weight", "fp8")
    if weight.dtype != P.FP8_DTYPE:
        raise CalibError(f"{module}.weight: {weight.dtype}, expected {P.FP8_DTYPE} (fp8 checkpoint)")
    n = weight.shape[0]
    scale = per_channel(take(tensors, f"{module}.weight_scale", "fp8"), n, f"{module}.weight_scale")
    check_finite_positive(scale, f"{module}.weight_scale")
    bias = tensors.pop(f"{module}.bias", None)
    bias = None if bias is None else bias.to(torch.float32)
    if activation_scheme == "static":
        input_scale = take(tensors, f"{module}.input_scale", "static fp8 activations").reshape(-1).float()
        check_finite_positive(input_scale, f"{module}.input_scale")
        return QuantLinear("fp8_static", weight, scale, bias, float(input_scale[0]))
    tensors.pop(f"{module}.input_scale", None)
    return QuantLinear("fp8_dynamic", weight, scale, bias)
