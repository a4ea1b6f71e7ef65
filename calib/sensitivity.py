"""disable_level: rank Linears by how much quantizing each one alone hurts, keep the worst in float.

The score of a Linear is the per-token relative output error (mean_t |y_t - y_q,t|^2 / |y_t|^2)
of that Linear quantized with its planned type and activation range, measured on the sampled
calibration rows of its input while every other layer stays float (per token, so the few
massive-activation tokens cannot hide the damage done to all the others). msModelSlim's own statistic
(max|x| / std of the input) is reported next to it.

The runtime fuses q/k/v and gate/up and needs one type per fused layer, so a Linear kept in
float takes its fused siblings with it; those are reported as such.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping

import torch
from tqdm import tqdm

from calib.config import CalibError
from calib.model_spec import LinearGroup, group_of
from calib.quantize import simulate_linear, token_relative_error

WeightLookup = Callable[[str], tuple[torch.Tensor, torch.Tensor | None]]


def score_layers(groups: list[LinearGroup], weights: WeightLookup, samples: Mapping[str, torch.Tensor],
                 quant_types: Mapping[str, str], ranges: Mapping[str, tuple[float, float] | None],
                 progress: bool = True) -> dict[str, float]:
    """Linear name -> relative output error of quantizing it alone (higher = more sensitive)."""
    scores: dict[str, float] = {}
    for group in tqdm(groups, desc="sensitivity", disable=not progress):
        x = samples[group.key]                                              # [r, k]
        for name in group.names:
            if quant_types[name] == "FLOAT":
                continue
            weight, bias = weights(name)
            reference = simulate_linear("FLOAT", weight, bias, x)
            approx = simulate_linear(quant_types[name], weight, bias, x, ranges.get(group.key))
            scores[name] = token_relative_error(reference, approx)
    return scores


def select_float_layers(scores: Mapping[str, float], level: int, disable_names: list[str],
                        groups: list[LinearGroup], kept: Mapping[str, str] | None = None) -> dict[str, str]:
    """Linear name -> why it stays FLOAT: `--disable_names`, `kept` (e.g. `--speed_aware`'s
    layers, with their reasons), the top-`level` scores of the others, fused siblings.

    CalibError for a disable name that is not a decoder Linear of the model.
    """
    by_name = group_of(groups)
    reasons: dict[str, str] = {}
    for pattern in disable_names:
        for name in expand_names(pattern, by_name):
            reasons[name] = "--disable_names" if name == pattern else f"--disable_names {pattern}"
    for name, why in (kept or {}).items():
        reasons.setdefault(name, why)
    ranked = sorted((n for n in scores if n not in reasons), key=lambda n: scores[n], reverse=True)
    for rank, name in enumerate(ranked[:level], start=1):
        reasons[name] = (f"disable_level L{level}: sensitivity rank {rank}/{len(ranked)}, "
                         f"output error {scores[name]:.3e}")
    for name in list(reasons):
        for sibling in by_name[name].names:
            reasons.setdefault(sibling, f"fused with {name} (one type per fused runtime layer)")
    return reasons


def expand_names(pattern: str, by_name: Mapping[str, LinearGroup], flag: str = "--disable_names") -> list[str]:
    """The Linears a `--disable_names` (or `flag`) entry means: itself, or every match of a glob
    pattern (`*.mlp.down_proj`, msModelSlim's default W8A8 fall-back); CalibError when none matches."""
    if any(c in pattern for c in "*?["):
        matches = [name for name in by_name if fnmatch.fnmatchcase(name, pattern)]
    else:
        matches = [pattern] if pattern in by_name else []
    if not matches:
        examples = ", ".join(list(by_name)[:3])
        raise CalibError(f"{flag}: {pattern!r} matches no decoder Linear of this model "
                         f"(names look like {examples})")
    return matches
