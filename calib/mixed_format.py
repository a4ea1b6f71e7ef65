"""MoFQ ("mixture of formats"): per layer, INT8 or FP8, whichever reproduces the output better.

Both candidates quantize activations dynamically per token: W8A8_DYNAMIC (int8 per-channel
weights, int8 per-token activations) and WFP8AFP8_DYNAMIC (e4m3 per-channel weights, e4m3
per-token activations). Integer grids suit flat distributions, fp8's log-spaced grid suits
heavy-tailed ones; the measured output error on the calibration rows decides. A fused group
(q/k/v, gate/up) gets one format, chosen by its summed error.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from tqdm import tqdm

from calib.model_spec import LinearGroup
from calib.quantize import simulate_linear, token_relative_error
from calib.sensitivity import WeightLookup

CANDIDATE_FORMATS = ("W8A8_DYNAMIC", "WFP8AFP8_DYNAMIC")


@dataclass(frozen=True)
class FormatChoice:
    """The chosen type of one group and each candidate's relative output error."""

    quant_type: str
    errors: dict[str, float]


def choose_formats(groups: list[LinearGroup], weights: WeightLookup, samples: Mapping[str, torch.Tensor],
                   progress: bool = True) -> dict[str, FormatChoice]:
    """Group key -> FormatChoice (ties go to INT8, the first candidate)."""
    choices: dict[str, FormatChoice] = {}
    for group in tqdm(groups, desc="mixed format", disable=not progress):
        choices[group.key] = _choose(group, weights, samples[group.key])
    return choices


def _choose(group: LinearGroup, weights: WeightLookup, x: torch.Tensor) -> FormatChoice:
    errors = {fmt: 0.0 for fmt in CANDIDATE_FORMATS}
    for name in group.names:
        weight, bias = weights(name)
        reference = simulate_linear("FLOAT", weight, bias, x)
        for fmt in CANDIDATE_FORMATS:
            errors[fmt] += token_relative_error(reference, simulate_linear(fmt, weight, bias, x))
    best = min(CANDIDATE_FORMATS, key=lambda fmt: errors[fmt])
    return FormatChoice(best, errors)
