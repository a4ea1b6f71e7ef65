"""Per-channel activation statistics of Linear inputs, collected with forward hooks.

One pass over the calibration batches records, for every watched Linear, the per-input-channel
min / max of its input and a small evenly spaced subsample of its input rows (the tokens the
scale searches measure their quantization error on). Hooks are always removed afterwards.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

_TINY = 1e-8   # floors a median absmax so an all-zero channel set gives a finite ratio


@dataclass(slots=True)
class ChannelStats:
    """Statistics of one Linear's input over the calibration set."""

    min: torch.Tensor        # [k] float32, per input channel
    max: torch.Tensor        # [k] float32
    samples: torch.Tensor    # [t, k] float32, subsampled input rows (t <= num_rows)
    num_tokens: int          # tokens seen in total

    @property
    def absmax(self) -> torch.Tensor:
        """max |x| per channel, [k]."""
        return torch.maximum(self.min.abs(), self.max.abs())


def outlier_ratio(absmax: torch.Tensor) -> float:
    """max / median of per-channel absmax: how far the worst channel sticks out (1.0 = flat)."""
    return float(absmax.max() / absmax.median().clamp_min(_TINY))


class _Recorder:
    """Accumulates one Linear's input statistics; used as a forward pre-hook."""

    def __init__(self, rows_per_batch: int) -> None:
        self.rows_per_batch = rows_per_batch
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None
        self.samples: list[torch.Tensor] = []
        self.num_tokens = 0

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach().float().reshape(-1, args[0].shape[-1])    # [num_tokens, k]
        lo, hi = x.amin(dim=0), x.amax(dim=0)                           # [k]
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)
        num_rows = min(self.rows_per_batch, x.shape[0])
        idx = torch.linspace(0, x.shape[0] - 1, num_rows, device=x.device).round().long()
        self.samples.append(x[idx].clone())                             # [num_rows, k]
        self.num_tokens += x.shape[0]

    def result(self, name: str) -> ChannelStats:
        if self.min is None:
            raise ValueError(f"{name}: no input was recorded (the module never ran on the calibration batches)")
        return ChannelStats(self.min, self.max, torch.cat(self.samples), self.num_tokens)


@torch.no_grad()
def collect_input_stats(model: nn.Module, names: list[str], calib_batches: list[torch.Tensor],
                        num_rows: int, runner: nn.Module | None = None) -> dict[str, ChannelStats]:
    """Run the model over `calib_batches` and return the input statistics of the named Linears.

    names: module names as in `model.named_modules()`; num_rows: input rows (tokens) kept per Linear in total
    (spread evenly over the batches); runner: the module actually called (default `model`; the
    decoder alone skips the lm_head, whose logits nobody needs here). The hooks are removed even
    if the forward raises.
    """
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"collect_input_stats: no module named {missing[0]!r} in the model")
    rows_per_batch = max(1, math.ceil(num_rows / len(calib_batches)))
    recorders = {n: _Recorder(rows_per_batch) for n in names}
    handles = [modules[n].register_forward_pre_hook(recorders[n]) for n in names]
    try:
        for input_ids in calib_batches:
            (runner or model)(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {n: rec.result(n) for n, rec in recorders.items()}
