"""FastDeploy pre-quantized wint8 / wint4 (`{prefix}.quant_weight` + `weight_scale`) -> NeutralCheckpoint.

The stored layout (Paddle's CUTLASS one unless `is_permuted: false`) is read back to row-major
codes by the runtime's own reader (`quant/weight_only_layout.py`), so a checkpoint converts exactly
when it would load here. Per-channel symmetric codes: wint8 -> W8A16 / 8-bit pack-quantized,
wint4 -> 4-bit pack-quantized (lossless: the same codes and scales).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ascend_llm.numerics import primitives as P
from ascend_llm.quant.formats import config_quant_method
from ascend_llm.quant.weight_only_layout import LEGACY_WEIGHT, QUANT_WEIGHT, WeightOnlyLayout, read_is_permuted
from calib.config import CalibError
from calib.convert.checkpoint_files import check_finite_positive, linear_modules, per_channel, read_config, read_tensors, take
from calib.convert.neutral import NeutralCheckpoint, QuantLinear

BITS = {"wint8": 8, "wint4": 4}


def read_fastdeploy(src: Path) -> NeutralCheckpoint:
    """The FastDeploy checkpoint in `src` (config.json `quantization_config.quantization: wint8|wint4`)."""
    source = f"{src}/config.json"
    config = read_config(src)
    quant = config.pop("quantization_config", None)
    if not isinstance(quant, dict):
        raise CalibError(f"{source}: no quantization_config (not a FastDeploy pre-quantized checkpoint)")
    try:
        method = config_quant_method(quant, source)
        layout = WeightOnlyLayout(BITS.get(method, 0), read_is_permuted(quant, source) if method in BITS else True)
    except ValueError as exc:
        raise CalibError(str(exc)) from None
    if method not in BITS:
        raise CalibError(f"{source}: FastDeploy quantization {method!r} is not converted (wint8, wint4)")
    if quant.get("is_quantized", True) is False or quant.get("is_checkpoint_bf16", False):
        raise CalibError(f"{source}: a float checkpoint quantized online at load (is_quantized false / "
                         f"is_checkpoint_bf16 true); there is nothing to convert")
    tensors = read_tensors(src)
    checkpoint = NeutralCheckpoint(config)
    leaf = QUANT_WEIGHT if layout.permuted else _row_major_leaf(tensors)
    for module in linear_modules(tensors, (leaf,)):
        if f"{module}.weight_scale" not in tensors:
            continue                                  # a float tensor named `weight` (row-major files)
        checkpoint.linears[module] = _read_linear(tensors, module, leaf, layout)
    checkpoint.floats = tensors
    return checkpoint


def _row_major_leaf(tensors: dict[str, torch.Tensor]) -> str:
    """`is_permuted: false` files use `quant_weight`, or this project's older `weight` name."""
    return QUANT_WEIGHT if any(name.endswith(f".{QUANT_WEIGHT}") for name in tensors) else LEGACY_WEIGHT


def _read_linear(tensors: dict[str, torch.Tensor], module: str, leaf: str, layout: WeightOnlyLayout) -> QuantLinear:
    name = f"{module}.{leaf}"
    stored = take(tensors, name, f"wint{layout.bits}")
    try:
        codes = layout.to_kernel(None, stored, name)                 # int8 [n, k] / uint8 [n, k / 2]
    except ValueError as exc:
        raise CalibError(str(exc)) from None
    if layout.bits == 4:
        k = stored.shape[1] if layout.permuted else 2 * codes.shape[1]
        codes = P.unpack_int4(codes, k)                             # int8 [n, k]
    n = codes.shape[0]
    scale = per_channel(take(tensors, f"{module}.weight_scale", name), n, f"{module}.weight_scale")
    check_finite_positive(scale, f"{module}.weight_scale")
    bias = tensors.pop(f"{module}.bias", None)
    scheme = "int8_weight_only" if layout.bits == 8 else "int4_weight_only"
    return QuantLinear(scheme, codes, scale, None if bias is None else bias.to(torch.float32))
