"""Activation observers: min-max, histogram clip search, the automatic per-layer choice."""
from __future__ import annotations

import pytest
import torch

from calib.model_spec import LinearGroup
from calib.observers import (HistogramObserver, MinMaxObserver, RowSampler, activation_qparams,
                             fake_quant_activation)
from calib.pipeline import GroupStats, choose_observer


def quant_mse(x: torch.Tensor, x_range: tuple[float, float]) -> float:
    return float(((fake_quant_activation(x, *activation_qparams(*x_range)) - x) ** 2).mean())


def observed(x: torch.Tensor, chunks: int = 4) -> GroupStats:
    stats = GroupStats(histogram=HistogramObserver(), rows=RowSampler(512, seed=0))
    for part in x.chunk(chunks):
        stats.update(part)
    return stats


def test_activation_qparams_follow_the_format_formulas():
    scale, offset = activation_qparams(-1.0, 3.0)
    assert scale == pytest.approx(4.0 / 255)
    assert offset == round(1.0 / scale) - 128
    assert activation_qparams(0.5, 2.0)[1] == -128                  # the range always holds 0
    x = torch.linspace(-1, 3, 1000)
    err = (fake_quant_activation(x, scale, offset) - x).abs().max()
    assert float(err) <= scale / 2 + 1e-6


def test_histogram_clip_beats_min_max_with_outliers():
    torch.manual_seed(0)
    x = torch.distributions.StudentT(2.0).sample((50_000,))        # heavy tails: rare outliers
    stats = observed(x.reshape(-1, 100))
    minmax, hist = stats.minmax.range(), stats.histogram.range()
    assert minmax == (pytest.approx(float(x.min())), pytest.approx(float(x.max())))
    assert hist[1] < minmax[1] and hist[0] > minmax[0]              # it clips
    assert quant_mse(x, hist) < 0.95 * quant_mse(x, minmax)
    # and it is near the best clip of a brute-force scan over shrunken ranges
    best = min(quant_mse(x, (minmax[0] * f, minmax[1] * g))
               for f in torch.linspace(0.2, 1, 9).tolist() for g in torch.linspace(0.2, 1, 9).tolist())
    assert quant_mse(x, hist) < 1.1 * best


def test_histogram_keeps_the_full_range_of_uniform_data():
    x = torch.rand(100_000, generator=torch.Generator().manual_seed(1)) * 6 - 2    # U(-2, 4)
    lo, hi = observed(x.reshape(-1, 50)).histogram.range()
    assert lo == pytest.approx(-2.0, rel=0.05) and hi == pytest.approx(4.0, rel=0.05)


def test_histogram_rebinning_keeps_counts_and_mass_location():
    obs = HistogramObserver(bins=256)
    obs.update(torch.full((100,), 0.5))
    obs.update(torch.tensor([-3.0, 7.0]))                            # widens the range twice over
    assert float(obs.hist.sum()) == 102
    centers = obs._centers(obs.lo, obs.hi)
    peak = float(centers[int(obs.hist.argmax())])
    assert peak == pytest.approx(0.5, abs=2 * (obs.hi - obs.lo) / 256)


def test_min_max_observer_moments():
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(2)) * 3 + 1
    obs = MinMaxObserver()
    for part in x.chunk(7):
        obs.update(part)
    assert obs.std == pytest.approx(float(x.std()), rel=1e-3)
    assert obs.outlier_score == pytest.approx(float(x.abs().max() / x.std()), rel=1e-3)
    with pytest.raises(ValueError, match="no activations"):
        MinMaxObserver().range()


def test_row_sampler_is_a_uniform_reservoir():
    sampler = RowSampler(100, seed=0)
    rows = torch.arange(5000, dtype=torch.float32)[:, None].repeat(1, 3)   # row i holds i
    for part in rows.chunk(50):
        sampler.update(part)
    kept = sampler.sample()[:, 0]
    assert kept.shape == (100,) and len(set(kept.tolist())) == 100
    assert 1500 < float(kept.mean()) < 3500                         # not just the first / last rows


def _group(weights: dict[str, torch.Tensor]) -> tuple[LinearGroup, object]:
    group = LinearGroup("g", tuple(weights), 0)
    return group, lambda name: (weights[name], None)


def test_auto_picks_per_layer_by_output_error():
    """Same input, two layers: clipping the outlier channel hurts the layer that reads it
    (min-max wins) and helps the layer that ignores it (histogram wins)."""
    torch.manual_seed(3)
    x = torch.distributions.StudentT(3.0).sample((4000, 64))       # heavy-tailed inputs ...
    x[:, 0] *= 8                                                     # ... one channel far wider
    stats = observed(x)
    assert stats.histogram.range()[1] < stats.minmax.range()[1]      # the histogram clips it
    reads_outlier = torch.randn(32, 64) * 0.01
    reads_outlier[:, 0] = 1.0
    ignores_outlier = torch.randn(32, 64)
    ignores_outlier[:, 0] = 0.0
    picks = {}
    for name, weight in (("reads", reads_outlier), ("ignores", ignores_outlier)):
        group, lookup = _group({name: weight})
        observer, x_range, errors = choose_observer(group, stats, 3, lookup)
        assert set(errors) == {"minmax", "histogram"}
        assert errors[observer] == min(errors.values())
        assert x_range == (stats.minmax.range() if observer == "minmax" else stats.histogram.range())
        picks[name] = observer
    assert picks == {"reads": "minmax", "ignores": "histogram"}
    # fixed methods do not measure
    group, lookup = _group({"a": ignores_outlier})
    assert choose_observer(group, stats, 1, lookup)[:3:2] == ("minmax", {})
    assert choose_observer(group, stats, 2, lookup)[:3:2] == ("histogram", {})
