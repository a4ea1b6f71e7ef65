"""Input Hessians H = X^T X of every decoder Linear group, from calibration batches."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
from tqdm import tqdm

from calib.finite import check_finite_activation
from calib.model_spec import LinearGroup


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
