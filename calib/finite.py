"""NaN / inf detection: a non-finite weight or calibration activation would silently produce a
useless scale, so both are reported with the tensor / layer name instead."""
from __future__ import annotations

import torch
import torch.nn as nn

from calib.config import CalibError


def check_finite_weights(model: nn.Module, when: str) -> None:
    """CalibError naming the first parameter holding NaN or inf (`when`: e.g. "in the checkpoint")."""
    for name, param in model.named_parameters():
        bad = ~torch.isfinite(param.detach())
        if bad.any():
            raise CalibError(f"weight {name!r} {when} holds {_describe(param.detach(), bad)}; "
                             f"the checkpoint cannot be calibrated")


def check_finite_activation(x: torch.Tensor, layer: str) -> None:
    """CalibError if the input `x` [T, k] of Linear `layer` holds NaN or inf."""
    bad = ~torch.isfinite(x)
    if bad.any():
        raise CalibError(f"calibration activation at the input of {layer!r} holds {_describe(x, bad)} "
                         f"(an upstream weight or the float32 range overflows)")


def _describe(tensor: torch.Tensor, bad: torch.Tensor) -> str:
    nans = int(torch.isnan(tensor).sum())
    infs = int(bad.sum()) - nans
    return f"non-finite values ({nans} NaN, {infs} inf of {tensor.numel()})"
