"""Anti-outlier smoothing before quantization (msModelSlim `--anti_method m1|m2|m3|m4|m6`).

`apply_anti_outlier(model, method, calib_batches, **options)` folds per-channel smoothing scales
(and for m2 a shift, held by a norm bias) into a transformers Llama / Qwen2 float model in place:
its float output is unchanged while the Linear inputs lose their per-channel outliers. The
returned `SmoothReport` says, per smoothing group, what was chosen and what it did.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from calib.smoothing.fold import SmoothGroup, find_groups, fold_group
from calib.smoothing.methods import (QuantSpec, ScalePlan, group_data, plan_m1, plan_m2, plan_m3, plan_m4_step,
                                     plan_m6)
from calib.smoothing.stats import ChannelStats, collect_input_stats, outlier_ratio

logger = logging.getLogger(__name__)

_COMMON_OPTIONS = {"w_bit": 8, "a_bit": 8, "is_dynamic": False, "num_search_tokens": 128, "skip_down_proj": False,
                   "group_size": 0}
_METHOD_OPTIONS = {
    "m1": {"alpha": 0.5},
    "m2": {"alpha": 0.5},
    "m3": {"grid": tuple(i / 10 for i in range(11)), "statistic": "absmax"},
    "m4": {"step": 0.125, "iterations": 6},
    "m6": {"grid": (0.2, 0.35, 0.5, 0.65, 0.8)},
}
# method -> (planner, the options it takes after (data, spec))
_PLANNERS = {"m1": (plan_m1, ("alpha",)), "m2": (plan_m2, ("alpha",)), "m3": (plan_m3, ("grid", "statistic")),
             "m6": (plan_m6, ("grid",))}
_CHECKS = {   # option -> (valid?, what it must be)
    "alpha": (lambda v: isinstance(v, (int, float)) and 0.0 <= v <= 1.0, "a number in [0, 1]"),
    "step": (lambda v: isinstance(v, (int, float)) and 0.0 < v <= 0.5, "a number in (0, 0.5]"),
    "iterations": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    "grid": (lambda v: isinstance(v, (list, tuple)) and len(v) > 0
             and all(isinstance(a, (int, float)) and 0.0 <= a <= 1.0 for a in v),
             "a non-empty list of numbers in [0, 1]"),
    "w_bit": (lambda v: v in (4, 8), "4 or 8"),
    "group_size": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                   "0 (per channel) or a positive number of input columns"),
    "statistic": (lambda v: v in ("absmax", "mean"), "'absmax' or 'mean'"),
    "a_bit": (lambda v: v in (8, 16), "8 or 16"),
    "is_dynamic": (lambda v: isinstance(v, bool), "a bool"),
    "skip_down_proj": (lambda v: isinstance(v, bool), "a bool"),
    "num_search_tokens": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
}
COLUMNS = ("group", "method", "alpha", "beta", "steps", "shift", "absmax before", "absmax after", "max/median before",
           "max/median after", "mse before", "mse after", "fold")


@dataclass(slots=True)
class SmoothEntry:
    """What smoothing did to one group (a producer and the Linears reading it)."""

    name: str
    method: str
    producer: str
    reader: str                   # the first Linear reading the smoothed tensor (its input stats)
    folded: bool
    reason: str | None            # why nothing was folded (skipped layout, or no gain)
    alpha: float | None
    beta: float | None
    shift: bool                   # m2: a norm bias / Linear bias shift was folded too
    iterations: int | None        # m4: accepted steps
    absmax_before: float          # max |x| over the readers' input channels
    absmax_after: float
    ratio_before: float           # max / median of the per-channel absmax
    ratio_after: float
    error_before: float | None    # quantized group output MSE on calibration rows
    error_after: float | None


@dataclass(slots=True)
class SmoothReport:
    """Per-group results of `apply_anti_outlier`; `to_rows()` for a table, `to_dict()` for JSON."""

    method: str
    options: dict
    entries: list[SmoothEntry] = field(default_factory=list)

    def to_rows(self) -> list[tuple[str, ...]]:
        """One tuple of strings per group, in the order of `COLUMNS`."""
        def num(v: float | None) -> str:
            return "-" if v is None else f"{v:.4g}"
        return [(e.name, e.method, num(e.alpha), num(e.beta), num(e.iterations), "yes" if e.shift else "no",
                 num(e.absmax_before), num(e.absmax_after), num(e.ratio_before), num(e.ratio_after),
                 num(e.error_before), num(e.error_after), "applied" if e.folded else f"skipped: {e.reason}")
                for e in self.entries]

    def to_dict(self) -> dict:
        """JSON-ready dict: method, options and one dict per group."""
        return {"method": self.method, "options": dict(self.options), "groups": [asdict(e) for e in self.entries]}


def resolve_options(method: str, options: dict) -> dict:
    """Defaults of `method` updated with `options`; unknown methods, names or values -> ValueError."""
    if method not in _METHOD_OPTIONS:
        raise ValueError(f"unknown anti-outlier method {method!r}; known methods: {', '.join(_METHOD_OPTIONS)}")
    resolved = {**_COMMON_OPTIONS, **_METHOD_OPTIONS[method]}
    unknown = sorted(set(options) - set(resolved))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(map(repr, unknown))} for anti-outlier method {method}; "
                         f"it takes: {', '.join(sorted(resolved))}")
    for name, value in options.items():
        valid, what = _CHECKS[name]
        if not valid(value):
            raise ValueError(f"anti-outlier option {name}={value!r}: must be {what}")
    return {**resolved, **options}


def _check_batches(calib_batches: list[torch.Tensor]) -> None:
    if not isinstance(calib_batches, (list, tuple)) or not calib_batches:
        raise ValueError("calib_batches: expected a non-empty list of input_ids tensors [1, seq]")
    for i, ids in enumerate(calib_batches):
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] < 1 or ids.is_floating_point():
            raise ValueError(f"calib_batches[{i}]: expected an integer input_ids tensor [1, seq], got "
                             f"{getattr(ids, 'dtype', type(ids).__name__)} {tuple(getattr(ids, 'shape', ()))}")


def _plan_once(groups: list[SmoothGroup], stats: dict[str, ChannelStats], method: str, spec: QuantSpec,
               opts: dict) -> dict[str, tuple[ScalePlan, int | None]]:
    """m1 / m2 / m3 / m6: one plan per group from one set of statistics, folded group by group."""
    plans = {}
    for group in groups:
        planner, names = _PLANNERS[method]
        plan = planner(group_data(group, stats[group.linear_names[0]]), spec, *(opts[n] for n in names))
        if plan.applied:
            fold_group(group, plan.scale, plan.shift)
        plans[group.name] = (plan, None)
    return plans


def _plan_iterative(groups: list[SmoothGroup], stats: dict[str, ChannelStats], collect, spec: QuantSpec,
                    opts: dict) -> dict[str, tuple[ScalePlan, int | None]]:
    """m4: partial m1 steps on re-collected statistics until a group's error stops improving."""
    plans, active = {}, list(groups)
    for iteration in range(opts["iterations"]):
        if iteration:
            stats = collect()
        for group in list(active):
            plan = plan_m4_step(group_data(group, stats[group.linear_names[0]]), spec, opts["step"])
            unsmoothed = ScalePlan(torch.ones_like(plan.scale), error_before=plan.error_before,
                                   error_after=plan.error_before, applied=False)
            if not plan.applied:
                active.remove(group)
                plans.setdefault(group.name, (unsmoothed, 0))
                continue
            fold_group(group, plan.scale)
            done, steps = plans.get(group.name, (unsmoothed, 0))
            plans[group.name] = (ScalePlan(done.scale * plan.scale, None, plan.alpha, plan.beta, done.error_before,
                                           plan.error_after), steps + 1)      # total scale; first before, last after
        if not active:
            break
    return plans


def _entry(group: SmoothGroup, method: str, before: ChannelStats, after: ChannelStats,
           planned: tuple[ScalePlan, int | None] | None) -> SmoothEntry:
    a_before, a_after = before.absmax, after.absmax                                     # [k] each
    plan, steps = planned if planned is not None else (None, None)
    folded = plan is not None and plan.applied
    if group.skip_reason is not None or folded:
        reason = group.skip_reason
    else:
        reason = "no smoothing lowered the quantization error"
    return SmoothEntry(
        name=group.name, method=method, producer=group.prev_name, reader=group.linear_names[0],
        folded=folded, reason=reason,
        alpha=plan and plan.alpha, beta=plan and plan.beta, shift=folded and plan.shift is not None,
        iterations=steps, absmax_before=float(a_before.max()), absmax_after=float(a_after.max()),
        ratio_before=outlier_ratio(a_before), ratio_after=outlier_ratio(a_after),
        error_before=plan and plan.error_before, error_after=plan and plan.error_after)


@torch.no_grad()
def apply_anti_outlier(model: nn.Module, method: str, calib_batches: list[torch.Tensor], **options) -> SmoothReport:
    """Smooth `model` (transformers LlamaForCausalLM / Qwen2ForCausalLM, float, eval) in place.

    calib_batches: input_ids tensors [1, seq]. Methods and their options (defaults in brackets):
    - "m1" SmoothQuant, s = max|X|^alpha / max|W|^(1 - alpha): alpha [0.5];
    - "m2" shift + scale: z = (max X + min X) / 2 into a norm bias (the norm becomes a
      `BiasedRMSNorm`) and Linear biases W @ z, then m1 on the centred range: alpha [0.5];
    - "m3" AWQ-style search over s = max|X|^a: grid of exponents a [0, 0.1, ..., 1];
    - "m4" iterative: steps s = (max|X| / max|W|)^step, statistics re-collected before each, until
      a group's error stops improving: step [0.125], iterations [6];
    - "m6" two-stage search of s = max|X|^alpha / max|W|^beta: grid for alpha, then beta [0.2 .. 0.8].
    Every method also takes w_bit [8], a_bit [8], is_dynamic [False] (the quantization whose error
    the searches and the report measure) and num_search_tokens [128] (calibration tokens kept per
    Linear for those measurements) and skip_down_proj [False] (leave the up_proj -> down_proj
    groups to the rotation, calib/rotation.py, which searches its own smoothing). q/k/v and gate/up inputs fold into the preceding norm, o_proj
    inputs into v_proj rows (skipped, and reported, when the head layout does not allow it),
    down_proj inputs into up_proj rows. Unknown methods or options, bad values -> ValueError.
    """
    opts = resolve_options(method, options)
    _check_batches(calib_batches)
    spec = QuantSpec(opts["w_bit"], opts["a_bit"], opts["is_dynamic"], opts["group_size"])
    groups = find_groups(model)
    names = [group.linear_names[0] for group in groups]

    def collect() -> dict[str, ChannelStats]:
        return collect_input_stats(model, names, calib_batches, opts["num_search_tokens"], runner=model.model)

    before = collect()
    if opts["skip_down_proj"]:
        for group in groups:
            if group.name.endswith(".mlp.down_proj") and group.skip_reason is None:
                group.skip_reason = "left to the down_proj rotation (calib/rotation.py)"
    foldable = [group for group in groups if group.skip_reason is None]
    for group in groups:
        if group.skip_reason is not None and not group.skip_reason.startswith("left to"):
            logger.warning("%s: not smoothed: %s", group.name, group.skip_reason)
    if method == "m4":
        plans = _plan_iterative(foldable, before, collect, spec, opts)
    else:
        plans = _plan_once(foldable, before, method, spec, opts)
    after = collect()
    entries = [_entry(g, method, before[n], after[n], plans.get(g.name)) for g, n in zip(groups, names)]
    logger.info("anti-outlier %s: %d of %d groups smoothed", method, sum(e.folded for e in entries), len(entries))
    return SmoothReport(method, opts, entries)
