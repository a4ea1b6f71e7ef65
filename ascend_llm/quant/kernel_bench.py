"""Measured, not assumed, speed per format (`ascend-llm inspect --bench`).

Every distinct linear layer shape of a loaded model, keyed by (scheme, bound kernels, in features,
out features, bias), is timed on this backend twice at each batch size (rows of the input):
- quantized: the layer's own `apply_method` (its quant method's apply, after the online Hadamard
  of a rotated layer), i.e. the kernels the op registry bound to it;
- float: a twin layer of the same shape in the model dtype whose `linear` kernel the registry
  binds as for any unquantized Linear (`UnquantizedLinearMethod`), with random weights.
A FLOAT layer without an online rotation is timed once, on itself, and counts as its own float time.

A timing is the median over `repeat` blocks (after `warmup` calls) of the seconds per call, each
block running enough calls to last ~`block_seconds` and ending with a device synchronize
(`platform.synchronize`), so that queued CUDA / NPU work is counted. `clock` is injectable: tests
drive a fake one and never assert wall times.

The expected decode speed-up of the checkpoint at a batch size is the float time summed over all
benchmarked layers (each shape counted once per layer) divided by the quantized time summed the
same way; a shape whose quantized time exceeds its float time is flagged slower (the "W8A8 no
faster than bf16" trap), and `python -m calib --speed_aware` keeps such layers in float.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ascend_llm.platform import synchronize
from ascend_llm.quant.audit import LayerAudit, audited_layers
from ascend_llm.quant.unquantized import UnquantizedLinearMethod

Clock = Callable[[], float]
DEFAULT_BATCH_SIZES = (1, 16)


@dataclass(frozen=True)
class TimerSettings:
    """How each (layer shape, kernel, batch) timing is taken."""
    warmup: int = 3
    repeat: int = 15
    block_seconds: float = 2e-3     # calls per timed block: enough to last this long
    max_calls: int = 200            # ... but at most this many


def seconds_per_call(fn: Callable[[], Any], device: torch.device, clock: Clock = time.perf_counter,
                     settings: TimerSettings = TimerSettings()) -> float:
    """Median seconds per call of `fn()` (see the module doc)."""
    for _ in range(settings.warmup):
        fn()
    synchronize(device)
    start = clock()
    fn()
    synchronize(device)
    once = max(clock() - start, 1e-9)
    calls = max(1, min(settings.max_calls, int(settings.block_seconds / once)))
    samples = []
    for _ in range(settings.repeat):
        start = clock()
        for _ in range(calls):
            fn()
        synchronize(device)
        samples.append((clock() - start) / calls)
    return statistics.median(samples)


@dataclass(frozen=True)
class ShapeKey:
    """What makes two layers time alike: scheme, bound kernels and the matmul shape."""
    scheme: str
    kernels: str
    path: str
    in_features: int
    out_features: int
    bias: bool


@dataclass
class ShapeBench:
    """The timings of one layer shape (microseconds per call, per batch size)."""
    key: ShapeKey
    layers: list[str]
    float_kernel: str
    quant_us: dict[int, float] = field(default_factory=dict)
    float_us: dict[int, float] = field(default_factory=dict)

    @property
    def quantized(self) -> bool:
        return self.key.scheme != "FLOAT"

    def ratio(self, batch: int) -> float:
        """Quantized / float time (> 1: the quantized kernel is slower); 1 for a FLOAT layer."""
        return self.quant_us[batch] / self.float_us[batch] if self.quantized else 1.0

    def slower(self, batch: int) -> bool:
        return self.quantized and self.quant_us[batch] > self.float_us[batch]

    def to_dict(self) -> dict[str, Any]:
        batches = list(self.quant_us)
        return {"scheme": self.key.scheme, "kernels": self.key.kernels, "path": self.key.path,
                "float_kernel": self.float_kernel, "in_features": self.key.in_features,
                "out_features": self.key.out_features, "bias": self.key.bias,
                "num_layers": len(self.layers), "layers": list(self.layers),
                "quant_us": {str(b): round(self.quant_us[b], 3) for b in batches},
                "float_us": {str(b): round(self.float_us[b], 3) for b in batches},
                "ratio": {str(b): round(self.ratio(b), 4) for b in batches},
                "slower": {str(b): self.slower(b) for b in batches}}


@dataclass
class KernelBench:
    """Every benchmarked shape, the layers left out (not a linear shape, e.g. MoE experts) and
    how the timings were taken."""
    backend: str
    dtype: torch.dtype
    batch_sizes: tuple[int, ...]
    shapes: list[ShapeBench]
    skipped: list[str]
    settings: TimerSettings

    def speedup(self, batch: int) -> float:
        """Expected decode speed-up over the float model: sum of float / sum of quantized time."""
        quant = sum(s.quant_us[batch] * len(s.layers) for s in self.shapes)
        floats = sum(s.float_us[batch] * len(s.layers) for s in self.shapes)
        return floats / quant if quant else 1.0

    def slower_layers(self, batch: int) -> list[str]:
        return [name for s in self.shapes if s.slower(batch) for name in s.layers]

    def to_dict(self) -> dict[str, Any]:
        batches = self.batch_sizes
        return {"backend": self.backend, "dtype": str(self.dtype).removeprefix("torch."),
                "batch_sizes": list(batches),
                "timer": {"statistic": "median", "warmup": self.settings.warmup,
                          "repeat": self.settings.repeat, "block_seconds": self.settings.block_seconds},
                "speedup": {str(b): round(self.speedup(b), 4) for b in batches},
                "slower_layers": {str(b): self.slower_layers(b) for b in batches},
                "shapes": [s.to_dict() for s in self.shapes], "skipped": list(self.skipped)}

    def table(self) -> str:
        """One row per shape: layers, quantized / float us and their ratio per batch, SLOWER flags;
        then the expected decode speed-up."""
        head = ["scheme", "kernels", "in", "out", "layers"]
        for b in self.batch_sizes:
            head += [f"quant us@{b}", f"float us@{b}", f"ratio@{b}", ""]
        rows = [head]
        for s in self.shapes:
            row = [s.key.scheme, s.key.kernels, str(s.key.in_features), str(s.key.out_features),
                   str(len(s.layers))]
            for b in self.batch_sizes:
                row += [f"{s.quant_us[b]:.1f}", f"{s.float_us[b]:.1f}", f"{s.ratio(b):.2f}",
                        "SLOWER" if s.slower(b) else ""]
            rows.append(row)
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        layers = sum(len(s.layers) for s in self.shapes)
        lines.append(f"expected decode speed-up over {str(self.dtype).removeprefix('torch.')} on "
                     f"{self.backend} ({layers} layers): " + ", ".join(
                         f"{self.speedup(b):.2f}x at batch {b}" for b in self.batch_sizes))
        for b in self.batch_sizes:
            slow = self.slower_layers(b)
            if slow:
                lines.append(f"slower than float at batch {b}: {len(slow)} layer(s)")
        if self.skipped:
            lines.append(f"not timed (no linear shape, e.g. MoE experts): {len(self.skipped)} layer(s)")
        return "\n".join(lines)


def bench_model(model: nn.Module, dtype: torch.dtype, backend: str,
                batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES, clock: Clock | None = None,
                settings: TimerSettings = TimerSettings()) -> KernelBench:
    """Time every distinct linear shape of `model` (module doc); `dtype`: the model dtype;
    `clock`: time.perf_counter unless given."""
    clock = clock or time.perf_counter
    groups: dict[ShapeKey, list[tuple[nn.Module, LayerAudit]]] = {}
    skipped = []
    for layer, audit in audited_layers(model):
        shape = _linear_shape(layer)
        if shape is None:
            skipped.append(audit.prefix)
            continue
        key = ShapeKey(audit.scheme, audit.kernel_names, audit.path, *shape, getattr(layer, "bias", None) is not None)
        groups.setdefault(key, []).append((layer, audit))
    shapes = [_bench_shape(key, members, dtype, batch_sizes, clock, settings) for key, members in groups.items()]
    return KernelBench(backend, dtype, tuple(batch_sizes), shapes, skipped, settings)


def _linear_shape(layer: nn.Module) -> tuple[int, int] | None:
    """(in features, out features) of a linear layer on this rank, None for other layers."""
    if hasattr(layer, "input_size") and hasattr(layer, "output_sizes"):
        return int(layer.input_size), int(sum(layer.output_sizes))
    weight = getattr(layer, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.is_floating_point():
        return int(weight.shape[1]), int(weight.shape[0])
    return None


def _bench_shape(key: ShapeKey, members: list[tuple[nn.Module, LayerAudit]], dtype: torch.dtype,
                 batch_sizes: Iterable[int], clock: Clock, settings: TimerSettings) -> ShapeBench:
    layer = members[0][0]
    device = _device_of(layer)
    rotated = getattr(layer, "input_hadamard_block", None) is not None
    twin = layer if key.scheme == "FLOAT" and not rotated else \
        float_twin(layer, key.in_features, key.out_features, dtype, device)
    run = getattr(layer, "apply_method", None) or (lambda x, b: layer.quant_method.apply(layer, x, b))
    bench = ShapeBench(key, [audit.prefix for _, audit in members], _kernel_names(twin))
    bias = getattr(layer, "bias", None)
    with torch.inference_mode():
        for batch in batch_sizes:
            x = torch.randn(batch, key.in_features, dtype=dtype, device=device)       # [b, k]
            float_s = seconds_per_call(lambda: twin.quant_method.apply(twin, x, bias), device, clock, settings)
            bench.float_us[batch] = float_s * 1e6
            bench.quant_us[batch] = bench.float_us[batch] if twin is layer else 1e6 * seconds_per_call(
                lambda: run(x, bias), device, clock, settings)
    return bench


def float_twin(layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype,
               device: torch.device) -> nn.Module:
    """A float layer [out, in] in `dtype` with the `linear` kernel the registry binds for an
    unquantized Linear on `layer`'s backend (random weights: only its speed is used)."""
    twin = nn.Module()
    twin.ops, twin.prefix = getattr(layer, "ops", None), f"{getattr(layer, 'prefix', '')}.float_twin"
    twin.quant_method = UnquantizedLinearMethod()
    with torch.device(device):
        twin.quant_method.create_weights(twin, in_features, [out_features], dtype)
    twin.weight.data.normal_(0.0, 0.02)
    twin.quant_method.process_weights_after_loading(twin)
    return twin


def _kernel_names(layer: nn.Module) -> str:
    names = [choice.kernel.name for choice in getattr(layer, "kernel_choices", ())]
    return ", ".join(names) or "torch F.linear"


def _device_of(layer: nn.Module) -> torch.device:
    tensor = next(iter(layer.parameters(recurse=False)), None)
    if tensor is None:
        tensor = next(iter(layer.buffers(recurse=False)))
    return tensor.device
