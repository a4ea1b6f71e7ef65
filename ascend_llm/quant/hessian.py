"""Input Hessians H = X^T X of a Linear layer: validation, dampening and the inverse factor
that GPTQ-style rounding (quant/wint2_gptq.py, calib/gptq.py) pushes errors through."""
from __future__ import annotations

import torch

DEFAULT_DAMP = 0.01           # dampening: damp * mean(diag H) added to the diagonal


def check_hessian(hessian: torch.Tensor, k: int, name: str = "hessian") -> None:
    """ValueError unless `hessian` is a finite [k, k] matrix."""
    if hessian.dim() != 2 or tuple(hessian.shape) != (k, k):
        raise ValueError(f"{name}: expected shape ({k}, {k}) for a weight with k={k}, "
                         f"got {tuple(hessian.shape)}")
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError(f"{name}: must be finite")


def damped(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 H with dead columns set to 1 and damp * mean(diag) added, dead mask [k])."""
    h = hessian.double().clone()
    diag = torch.diagonal(h)
    dead = diag <= 0
    h[dead, dead] = 1.0
    diag += damp * float(diag.mean())
    return h, dead


def inverse_hessian_factor(hessian: torch.Tensor, damp: float = DEFAULT_DAMP,
                           dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(U [k, k] upper triangular in `dtype` with H^-1 = U^T U (computed in float64), dead mask [k])."""
    h, dead = damped(hessian, damp)
    chol = torch.linalg.cholesky(h)
    u = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
    return u.to(dtype), dead
