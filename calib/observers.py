"""Activation observers: min-max (act_method 1), histogram clip search (2), and the pieces the
automatic per-layer choice (3) needs: a row sample of the inputs and the quantizer itself.

Static activation quantization is msModelSlim's per-tensor asymmetric int8 (format reference §1):
min' = min(x_min, 0), max' = max(x_max, 0), input_scale = (max' - min') / 255 (>= fp32 eps),
input_offset = round(-min' / input_scale) - 128, q = clamp(round(x / scale + offset), -128, 127).
"""
from __future__ import annotations

import math

import torch

INT8_MIN, INT8_MAX = -128, 127
_EPS = float(torch.finfo(torch.float32).eps)


def activation_qparams(x_min: float, x_max: float) -> tuple[float, float]:
    """(input_scale, input_offset) of a per-tensor asymmetric int8 range, as float32 values."""
    lo, hi = min(float(x_min), 0.0), max(float(x_max), 0.0)
    scale = float(torch.tensor(max((hi - lo) / 255, _EPS), dtype=torch.float32))
    offset = float(torch.round(torch.tensor(-lo / scale, dtype=torch.float32)) - 128)
    return scale, max(min(offset, INT8_MAX), INT8_MIN)


def fake_quant_activation(x: torch.Tensor, scale: float, offset: float) -> torch.Tensor:
    """x -> dequantized int8 x (what the static W8A8 kernel sees), same shape, float32."""
    q = torch.clamp(torch.round(x.float() / scale + offset), INT8_MIN, INT8_MAX)
    return (q - offset) * scale


class MinMaxObserver:
    """Running min / max plus the moments msModelSlim's disable_level score uses (max|x| / std)."""

    def __init__(self) -> None:
        self.x_min = math.inf
        self.x_max = -math.inf
        self.count = 0
        self.total = 0.0
        self.total_sq = 0.0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        lo, hi = torch.aminmax(x)
        self.x_min = min(self.x_min, float(lo))
        self.x_max = max(self.x_max, float(hi))
        self.count += x.numel()
        self.total += float(x.sum())                 # per-batch float32 sums, accumulated in Python
        self.total_sq += float(torch.dot(x.reshape(-1), x.reshape(-1)))

    def range(self) -> tuple[float, float]:
        """(min, max) seen so far; ValueError if nothing was observed."""
        if self.count == 0:
            raise ValueError("observer: no activations observed (was the layer ever called?)")
        return self.x_min, self.x_max

    @property
    def std(self) -> float:
        mean = self.total / max(self.count, 1)
        return math.sqrt(max(self.total_sq / max(self.count, 1) - mean * mean, 0.0))

    @property
    def outlier_score(self) -> float:
        """max(|min|, |max|) / std: msModelSlim's disable_level ranking statistic."""
        lo, hi = self.range()
        return max(abs(lo), abs(hi)) / max(self.std, _EPS)


class HistogramObserver:
    """A `bins`-bin histogram over the running range; `range()` searches the clip range
    [c_lo, c_hi] (c_lo <= 0 <= c_hi) that minimises the expected int8 quantization MSE:
    rounding error scale^2 / 12 for values inside, squared clipping distance outside."""

    def __init__(self, bins: int = 2048, grid: int = 40) -> None:
        self.bins = bins
        self.grid = grid
        self.lo = 0.0
        self.hi = 0.0
        self.hist = torch.zeros(bins, dtype=torch.float64)          # [bins] counts
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1)
        lo, hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))
        if hi <= lo:
            hi = lo + _EPS
        if self.count and (lo < self.lo or hi > self.hi):
            self.hist = self._rebin(lo, hi)
        self.lo, self.hi = lo, hi
        self.hist += torch.histc(x, self.bins, lo, hi).double()
        self.count += x.numel()

    def _rebin(self, lo: float, hi: float) -> torch.Tensor:
        """The histogram moved onto the wider range [lo, hi] (each old bin to its centre's new bin)."""
        centers = self._centers(self.lo, self.hi)                              # [bins]
        index = ((centers - lo) / (hi - lo) * self.bins).long().clamp(0, self.bins - 1)
        return torch.zeros_like(self.hist).index_add_(0, index, self.hist)

    def _centers(self, lo: float, hi: float) -> torch.Tensor:
        width = (hi - lo) / self.bins
        return lo + width * (torch.arange(self.bins, dtype=torch.float64) + 0.5)

    def range(self) -> tuple[float, float]:
        """The clip range with the lowest expected quantization MSE over the histogram.

        Candidates shrink each side of the observed range on a log grid (1 .. 1e-3). A bin of
        width w at centre c costs (c - dq(c))^2 + w^2 / 12 when its values share one int8 level
        (clipped, or w < scale), and scale^2 / 12 when it spans many levels.
        """
        if self.count == 0:
            raise ValueError("observer: no activations observed (was the layer ever called?)")
        occupied = self.hist > 0                                               # empty bins cost 0
        centers = self._centers(self.lo, self.hi)[occupied].float()            # [B'] occupied
        counts = self.hist[occupied].float()                                   # [B']
        width = (self.hi - self.lo) / self.bins
        shrink = torch.logspace(0, -3, self.grid)                              # [G]
        c_hi = (max(self.hi, 0.0) * shrink)[None, :, None]                    # [1, G, 1]
        c_lo = (min(self.lo, 0.0) * shrink)[:, None, None]                    # [G, 1, 1]
        scale = ((c_hi - c_lo) / 255).clamp_min(_EPS)                         # [G, G, 1]
        offset = torch.round(-c_lo / scale) - 128
        q = torch.clamp(torch.round(centers / scale + offset), INT8_MIN, INT8_MAX)
        center_error = (centers - (q - offset) * scale) ** 2                   # [G, G, B']
        clipped = (centers < c_lo) | (centers > c_hi)
        one_level = clipped | (width < scale)
        error = torch.where(one_level, center_error + width ** 2 / 12, scale ** 2 / 12)
        total = (error * counts).sum(dim=-1)                                   # [G, G]
        i, j = divmod(int(torch.argmin(total)), self.grid)
        return float(c_lo.reshape(-1)[i]), float(c_hi.reshape(-1)[j])


class RowSampler:
    """A uniform reservoir sample of up to `max_rows` input rows ([k] each) over all batches."""

    def __init__(self, max_rows: int, seed: int = 0) -> None:
        self.max_rows = max_rows
        self.rows: torch.Tensor | None = None                                  # [<= max_rows, k]
        self.seen = 0
        self.generator = torch.Generator().manual_seed(seed)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1, x.shape[-1]).cpu()                 # [T, k]
        free = 0 if self.rows is None else self.max_rows - self.rows.shape[0]
        if self.rows is None:
            self.rows, x, free = x[:self.max_rows].clone(), x[self.max_rows:], 0
            self.seen = self.rows.shape[0]
        elif free > 0:
            self.rows = torch.cat([self.rows, x[:free]])
            x, self.seen = x[free:], self.seen + min(free, x.shape[0])
        if x.shape[0]:                                                          # reservoir step
            index = self.seen + 1 + torch.arange(x.shape[0], dtype=torch.float64)  # 1-based
            slots = (torch.rand(x.shape[0], generator=self.generator, dtype=torch.float64)
                     * index).long()
            self.seen += x.shape[0]
            for row in torch.nonzero(slots < self.max_rows).reshape(-1).tolist():   # in order
                self.rows[int(slots[row])] = x[row]

    def sample(self) -> torch.Tensor:
        """The kept rows [r, k] float32; ValueError if nothing was observed."""
        if self.rows is None:
            raise ValueError("row sampler: no activations observed")
        return self.rows
