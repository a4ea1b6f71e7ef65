"""Smoothing-scale computations (m1, m2, m3, m6, one m4 step) and the quantization error they minimise.

Every method returns a `ScalePlan` for one `SmoothGroup`: a scale s per producer channel (and for
m2 a shift z), chosen from the group's input statistics. The searches measure, on subsampled
calibration rows, the mean squared error between the float output X @ W^T and the output of the
quantization that will follow smoothing:
- weights: symmetric int `w_bit` (4 or 8) per output channel, or per output channel and group of
  `group_size` input columns (weight-only W4A16 / W8A16 runs: AWQ measures the group quantizer);
- activations (a_bit 8): static per-tensor asymmetric int8 over the calibration range, or, with
  is_dynamic, per-token symmetric int8; a_bit 16 leaves activations in float.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ascend_llm.numerics.primitives import dequantize_per_channel, quantize_per_channel
from calib.smoothing.fold import SmoothGroup
from calib.smoothing.stats import ChannelStats

_EPS = 1e-5          # floor of activation / weight absmax before powers (dead channels)
_MAX_ROWS = 256      # output rows of a group kept for error measurement (per-row quantization is row-local)
_IMPROVE = 1e-4      # relative error drop an m4 step must achieve to count as an improvement


@dataclass(slots=True)
class QuantSpec:
    """The quantization that follows smoothing (what the searches measure error against)."""

    w_bit: int = 8
    a_bit: int = 8
    is_dynamic: bool = False
    group_size: int = 0          # weight scale per group of input columns (0 = per channel)


@dataclass(slots=True)
class ScalePlan:
    """A chosen smoothing for one group: scale [c] (and shift [c]) per producer channel.

    `applied` is False when the method keeps the group unsmoothed (a search where nothing beat
    the plain layer, or an m4 step that did not lower the error); then nothing is folded.
    """

    scale: torch.Tensor
    shift: torch.Tensor | None = None
    alpha: float | None = None
    beta: float | None = None
    error_before: float | None = None     # group output MSE of the quantized layer, without smoothing
    error_after: float | None = None      # ... with this plan
    applied: bool = True


@dataclass(slots=True)
class GroupData:
    """What the methods see of one group: input statistics and (row-subsampled) weights."""

    group: SmoothGroup
    act_min: torch.Tensor      # [k] per reader input channel
    act_max: torch.Tensor      # [k]
    samples: torch.Tensor      # [t, k] calibration input rows
    weight: torch.Tensor       # [n', k] float32, the readers' rows (at most _MAX_ROWS of them)
    w_absmax: torch.Tensor     # [k] max |W[:, j]| over all readers' rows
    ref_out: torch.Tensor      # [t, n'] float output samples @ weight^T

    def per_prev(self, per_input: torch.Tensor) -> torch.Tensor:
        """Reader-input-channel maxima [k] -> producer-channel maxima [c] (max over the channels it feeds)."""
        cmap = self.group.channel_map
        if cmap is None:
            return per_input
        out = torch.zeros(self.group.num_channels, dtype=per_input.dtype, device=per_input.device)
        return out.scatter_reduce(0, cmap.to(per_input.device), per_input, reduce="amax", include_self=False)

    @property
    def act_absmax(self) -> torch.Tensor:
        """max |x| per producer channel, [c]."""
        return self.per_prev(torch.maximum(self.act_min.abs(), self.act_max.abs()))

    @property
    def act_mean(self) -> torch.Tensor:
        """mean |x| per producer channel over the sampled rows, [c] (AWQ's activation statistic)."""
        return self.per_prev(self.samples.abs().mean(dim=0))

    @property
    def weight_absmax(self) -> torch.Tensor:
        """max |W| per producer channel, [c]."""
        return self.per_prev(self.w_absmax)


def group_data(group: SmoothGroup, stats: ChannelStats) -> GroupData:
    """Gather a group's statistics (from its first reader's input) and current weights."""
    full = torch.cat([linear.weight.detach().float() for linear in group.linears])    # [n, k]
    full = full.to(stats.samples.device)
    rows = torch.linspace(0, full.shape[0] - 1, min(_MAX_ROWS, full.shape[0]), device=full.device).round().long()
    weight = full[rows]                                                                 # [n', k]
    return GroupData(group, stats.min, stats.max, stats.samples, weight, full.abs().amax(dim=0),
                     stats.samples @ weight.T)


# ---------------------------------------------------------------- simulated quantization

def fake_quant_weight(weight: torch.Tensor, w_bit: int, group_size: int = 0) -> torch.Tensor:
    """Symmetric quantize + dequantize per output channel (or per channel and group of
    `group_size` input columns, which must divide k), [n, k] -> [n, k]."""
    if not group_size or group_size == weight.shape[1]:
        q, scale = quantize_per_channel(weight, w_bit)
        return dequantize_per_channel(q, scale)
    n, k = weight.shape
    q, scale = quantize_per_channel(weight.reshape(n * (k // group_size), group_size), w_bit)
    return dequantize_per_channel(q, scale).reshape(n, k)


def fake_quant_activation(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """int8 quantize + dequantize of activations x [t, k] (static range [lo, hi] or dynamic per token)."""
    if spec.a_bit == 16:
        return x
    if spec.is_dynamic:                                   # per token symmetric (npu_dynamic_quant)
        scale = (x.abs().amax(dim=1, keepdim=True) / 127.0).clamp_min(1e-12)              # [t, 1]
        return torch.round(x / scale).clamp(-127, 127) * scale
    lo, hi = lo.clamp_max(0.0), hi.clamp_min(0.0)         # msModelSlim: the range always holds 0
    scale = ((hi - lo) / 255.0).clamp_min(torch.finfo(torch.float32).eps)
    offset = torch.round(-lo / scale) - 128.0
    return (torch.round(x / scale + offset).clamp(-128, 127) - offset) * scale


def quant_error(data: GroupData, scale: torch.Tensor, shift: torch.Tensor | None, spec: QuantSpec) -> float:
    """Output MSE of the group's quantized Linears after smoothing with (scale, shift) [c], vs float."""
    s = data.group.expand(scale)                                                        # [k]
    z = torch.zeros_like(s) if shift is None else data.group.expand(shift)              # [k]
    x = (data.samples - z) / s                                                          # [t, k]
    lo, hi = ((data.act_min - z) / s).min(), ((data.act_max - z) / s).max()
    xq = fake_quant_activation(x, lo, hi, spec)
    wq = fake_quant_weight(data.weight * s, spec.w_bit, spec.group_size)                # [n', k]
    out = xq @ wq.T + data.weight @ z                                                   # [t, n'] (+ bias W @ z)
    return float((out - data.ref_out).pow(2).mean())


# ---------------------------------------------------------------- scale formulas

def smooth_scale(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """s_j = A_j^alpha / W_j^beta (SmoothQuant when beta = 1 - alpha), [c]."""
    return act_absmax.clamp_min(_EPS).pow(alpha) / weight_absmax.clamp_min(_EPS).pow(beta)


def _ones(data: GroupData) -> torch.Tensor:
    return torch.ones(data.group.num_channels, device=data.samples.device)                # [c]


def _unsmoothed_error(data: GroupData, spec: QuantSpec) -> float:
    return quant_error(data, _ones(data), None, spec)


def _plan(data: GroupData, spec: QuantSpec, scale: torch.Tensor, shift: torch.Tensor | None = None,
          alpha: float | None = None, beta: float | None = None) -> ScalePlan:
    """A plan with its error measured before (unsmoothed) and after."""
    return ScalePlan(scale, shift, alpha, beta, _unsmoothed_error(data, spec), quant_error(data, scale, shift, spec))


def plan_m1(data: GroupData, spec: QuantSpec, alpha: float) -> ScalePlan:
    """m1 SmoothQuant: s = max|X|^alpha / max|W|^(1 - alpha)."""
    scale = smooth_scale(data.act_absmax, data.weight_absmax, alpha, 1.0 - alpha)
    return _plan(data, spec, scale, alpha=alpha, beta=1.0 - alpha)


def plan_m2(data: GroupData, spec: QuantSpec, alpha: float) -> ScalePlan:
    """m2 shift and scale (Outlier Suppression+): z = (max + min) / 2, then m1 on the centred range.

    Only norm groups take a shift (the norm bias absorbs it); Linear-fed groups get m1 alone.
    """
    if data.group.kind != "norm":
        return plan_m1(data, spec, alpha)
    shift = (data.act_max + data.act_min) / 2.0                                         # [c]
    half_range = (data.act_max - data.act_min) / 2.0                                    # [c]
    scale = smooth_scale(half_range, data.weight_absmax, alpha, 1.0 - alpha)
    return _plan(data, spec, scale, shift, alpha=alpha, beta=1.0 - alpha)


def _best(data: GroupData, spec: QuantSpec, candidates: list[tuple[float, float | None, torch.Tensor]],
          unsmoothed: float) -> ScalePlan:
    """The candidate (alpha, beta, scale) of least quantization error; no smoothing if none beats
    `unsmoothed` (the group's error without smoothing)."""
    best = ScalePlan(_ones(data), None, None, None, unsmoothed, unsmoothed, applied=False)
    for alpha, beta, scale in candidates:
        err = quant_error(data, scale, None, spec)
        if err < best.error_after:
            best = ScalePlan(scale, None, alpha, beta, unsmoothed, err)
    return best


def plan_m3(data: GroupData, spec: QuantSpec, grid: Sequence[float], statistic: str = "absmax") -> ScalePlan:
    """m3 AWQ-style search: s = A^a (normalised to geometric-centre 1), a from `grid`, least error
    wins; A = max|X| per channel ("absmax") or, as AWQ, mean |X| ("mean")."""
    stat = data.act_mean if statistic == "mean" else data.act_absmax
    candidates = []
    for a in grid:
        s = stat.clamp_min(_EPS).pow(a)
        candidates.append((a, None, s / (s.max() * s.min()).sqrt()))
    return _best(data, spec, candidates, _unsmoothed_error(data, spec))


def plan_m6(data: GroupData, spec: QuantSpec, grid: Sequence[float]) -> ScalePlan:
    """m6 flexible smoothing: s = max|X|^alpha / max|W|^beta, two-stage grid search.

    Stage 1 searches alpha with beta = 1 - alpha; stage 2 keeps the best alpha and searches beta.
    """
    a_max, w_max = data.act_absmax, data.weight_absmax
    unsmoothed = _unsmoothed_error(data, spec)
    stage1 = _best(data, spec, [(a, 1.0 - a, smooth_scale(a_max, w_max, a, 1.0 - a)) for a in grid], unsmoothed)
    if not stage1.applied:                              # nothing beat the unsmoothed layer
        return stage1
    stage2 = _best(data, spec, [(stage1.alpha, b, smooth_scale(a_max, w_max, stage1.alpha, b)) for b in grid
                                if b != stage1.beta], stage1.error_after)
    if not stage2.applied:                              # no beta beat 1 - alpha
        return stage1
    stage2.error_before = unsmoothed
    return stage2


def plan_m4_step(data: GroupData, spec: QuantSpec, step: float) -> ScalePlan:
    """One m4 iteration: the partial balance s = (max|X| / max|W|)^step, applied only if it lowers
    the group's quantization error by more than a rounding-level amount."""
    scale = smooth_scale(data.act_absmax, data.weight_absmax, step, step)
    plan = _plan(data, spec, scale, alpha=step, beta=step)
    plan.applied = plan.error_after < plan.error_before * (1.0 - _IMPROVE)
    return plan
