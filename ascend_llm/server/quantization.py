"""The per-layer quantization audit over HTTP (`GET /v1/quantization`) and as Prometheus series.

The audit is taken once at load by the driver's model runner (`quant/audit.py`): under tensor
parallelism it is rank 0's shard, whose layers run the same schemes and kernels as every rank's.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ascend_llm.engine.async_engine import EngineUnavailableError
from ascend_llm.quant.audit import LayerAudit, audit_report

PREFIX = "ascend_llm:"


def quantization_report(llm_engine: Any) -> dict[str, Any]:
    """JSON body of `GET /v1/quantization` (`quant.audit.audit_report` of the engine's audit)."""
    return audit_report(llm_engine.quantization_audit(), llm_engine.backend)


class QuantizationCollector(Collector):
    """`ascend_llm:quant_layers{scheme, kernel, path}` (layers per scheme x kernels) and
    `ascend_llm:quant_kernel_fallbacks_total` (kernel choices that are a backend's plain-torch
    reference). The audit is fixed after load; before the model is loaded there are no series."""

    def __init__(self, audits: Callable[[], list[LayerAudit]], model_name: str) -> None:
        self._audits = audits
        self._model_name = model_name

    def collect(self) -> Iterator[Any]:
        try:
            audits = self._audits()
        except EngineUnavailableError:          # still loading (or failed): nothing to report yet
            return
        groups = Counter((a.scheme, a.kernel_names, a.path) for a in audits)
        layers = GaugeMetricFamily(PREFIX + "quant_layers", "Layers per quantization scheme and bound kernels.",
                                   labels=["model_name", "scheme", "kernel", "path"])
        for (scheme, kernels, path), count in sorted(groups.items()):
            layers.add_metric([self._model_name, scheme, kernels, path], count)
        yield layers
        fallbacks = CounterMetricFamily(PREFIX + "quant_kernel_fallbacks",
                                        "Layer kernels that are a backend's plain-torch reference fallback.",
                                        labels=["model_name"])
        fallbacks.add_metric([self._model_name],
                             sum(1 for a in audits for c in a.kernels if c.kernel.path == "reference"))
        yield fallbacks
