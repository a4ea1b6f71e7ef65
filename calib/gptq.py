"""GPTQ: error-compensating rounding of a Linear weight onto any quantization grid.

Columns are rounded left to right; each column's rounding error is pushed onto the columns not
yet rounded through the inverse Hessian of the layer's inputs (H = X^T X), so the layer's
*output* error on the calibration inputs shrinks, not just the weight error (Frantar et al.,
"GPTQ", 2022). The grid is a callback, so the same loop serves block FP8 and integer formats.
"""
from __future__ import annotations

from typing import Callable

import torch

from calib.hessians import DEFAULT_DAMP, inverse_hessian_factor

# round_columns(w_cols [n, b] fp32, first column index) -> the representable values [n, b]
RoundColumns = Callable[[torch.Tensor, int], torch.Tensor]

DEFAULT_BLOCK = 128        # columns updated lazily together (speed only; same result)


def gptq_round(weight: torch.Tensor, hessian: torch.Tensor, round_columns: RoundColumns,
               damp: float = DEFAULT_DAMP, block: int = DEFAULT_BLOCK) -> torch.Tensor:
    """weight [n, k] -> its rounded values [n, k] fp32 (every entry produced by round_columns)."""
    w = weight.detach().double().clone()                          # [n, k], updated in place
    n, k = w.shape
    if hessian.shape != (k, k):
        raise ValueError(f"hessian: shape {tuple(hessian.shape)} does not match the weight's "
                         f"k={k}")
    if not torch.isfinite(hessian).all():
        raise ValueError("hessian: holds NaN or inf (non-finite calibration activations)")
    # [k, k] upper; channels that never saw an input are rounded but receive no updates
    u, _ = inverse_hessian_factor(hessian, damp, torch.float64)
    out = torch.empty(n, k, dtype=torch.float64)
    for start in range(0, k, block):
        end = min(k, start + block)
        errors = torch.empty(n, end - start, dtype=torch.float64)  # scaled errors of this block
        for i in range(start, end):
            q = round_columns(w[:, i:i + 1].float(), i).double()[:, 0]   # [n]
            out[:, i] = q
            err = (w[:, i] - q) / u[i, i]
            w[:, i + 1:end] -= err.unsqueeze(1) * u[i, i + 1:end].unsqueeze(0)
            errors[:, i - start] = err
        w[:, end:] -= errors @ u[start:end, end:]
    return out.float()


def output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """Relative output error ||X (W - Q)^T||_F / ||X W^T||_F, from H = X^T X alone."""
    h = hessian.double()
    diff = (weight - approx).double()
    num = torch.einsum("nk,kj,nj->", diff, h, diff)
    den = torch.einsum("nk,kj,nj->", weight.double(), h, weight.double())
    return float((num / den.clamp_min(1e-30)).clamp_min(0).sqrt())
