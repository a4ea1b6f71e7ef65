"""Input Hessians H = X^T X of a Linear layer: collected for every decoder Linear group from
calibration batches; validated, dampened and turned into the inverse factor that GPTQ-style
rounding (calib/gptq.py, calib/wint2/gptq.py) pushes errors through."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
from tqdm import tqdm

from calib.finite import check_finite_activation
from calib.model_spec import LinearGroup

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


@contextmanager
def _hessian_hooks(model: nn.Module, groups: list[LinearGroup],
                   hessians: dict[str, torch.Tensor]) -> Iterator[None]:
    """Accumulate each group's input X [T, k] into hessians[group.key] += X^T X (fp64)."""
    modules = dict(model.named_modules())

    def hook(group: LinearGroup):
        def record(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double().cpu()    # [T, k]
            check_finite_activation(x, group.names[0])
            if group.key not in hessians:
                hessians[group.key] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
            hessians[group.key].addmm_(x.T, x)
        return record

    handles = [modules[g.names[0]].register_forward_pre_hook(hook(g)) for g in groups]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.inference_mode()
def collect_hessians(model: nn.Module, groups: list[LinearGroup], batches: list[torch.Tensor],
                     progress: bool = True) -> dict[str, torch.Tensor]:
    """group key -> H [k, k] fp64 summed over every calibration token (float model inputs)."""
    hessians: dict[str, torch.Tensor] = {}
    device = next(model.parameters()).device
    with _hessian_hooks(model, groups, hessians):
        for ids in tqdm(batches, desc="hessians", disable=not progress):
            model(input_ids=ids.to(device))
    return hessians
