"""Prometheus metrics, one registry per app: vLLM's names under the `ascend_llm:` prefix, and vLLM's own
`vllm:*` series (vllm_metrics.py) so dashboards written for vLLM work."""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ascend_llm.outputs import RequestOutput
from ascend_llm.server.vllm_metrics import FinishedRequest, VllmEngineCollector, VllmRequestMetrics

logger = logging.getLogger(__name__)

PREFIX = "ascend_llm:"
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)


@dataclass
class _Progress:
    """Per-request bookkeeping between steps (engine thread only)."""
    tokens: int = 0
    last_token_time: float | None = None


class _EngineCollector(Collector):
    """Gauges and cumulative counters read from the engine's stats snapshot at scrape time."""

    def __init__(self, stats: Callable[[], dict[str, Any]], model_name: str) -> None:
        self._stats = stats
        self._labels = {"model_name": model_name}

    def collect(self) -> Iterator[Any]:
        stats = self._stats()
        yield self._gauge("num_requests_running", "Requests in the running batch.", stats.get("num_running", 0))
        yield self._gauge("num_requests_waiting", "Requests waiting to be scheduled.",
                          stats.get("num_waiting", 0))
        yield self._gauge("num_requests_pending", "Requests admitted by the server and not finished.",
                          stats.get("num_pending", 0))
        yield self._gauge("kv_cache_usage_perc", "Fraction of KV cache blocks in use (0..1).",
                          stats.get("kv_cache_usage", 0.0))
        yield self._gauge("num_free_kv_blocks", "Free KV cache blocks (evictable cached ones included).",
                          stats.get("num_free_blocks", 0))
        yield self._counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                            stats.get("prefix_queries_tokens", 0))
        yield self._counter("prefix_cache_hits", "Prompt tokens served from the prefix cache.",
                            stats.get("prefix_hit_tokens", 0))
        yield self._counter("num_preemptions", "Sequences preempted for lack of KV blocks.",
                            stats.get("num_preemptions", 0))
        yield self._counter("spec_decode_num_draft_tokens", "Draft tokens proposed (speculative decoding).",
                            stats.get("spec_decode_num_draft_tokens", 0))
        yield self._counter("spec_decode_num_accepted_tokens", "Draft tokens accepted (speculative decoding).",
                            stats.get("spec_decode_num_accepted_tokens", 0))

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(PREFIX + name, doc, labels=list(self._labels))
        family.add_metric(list(self._labels.values()), float(value))
        return family

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(PREFIX + name, doc, labels=list(self._labels))
        family.add_metric(list(self._labels.values()), float(value))
        return family


class ServerMetrics:
    """Prometheus metrics of one server. Observes engine steps as an AsyncLLMEngine stats listener."""

    def __init__(self, model_name: str, stats: Callable[[], dict[str, Any]], max_model_len: int = 8192,
                 cache_info: Callable[[], dict[str, str] | None] = lambda: None) -> None:
        self.registry = CollectorRegistry()
        self._stats = stats
        self.model_name = model_name
        labels, reg = ["model_name"], self.registry
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prefill tokens processed.", labels, registry=reg)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated.", labels, registry=reg)
        self.request_success = Counter(PREFIX + "request_success", "Finished requests by finish reason.",
                                       labels + ["finished_reason"], registry=reg)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to first token.", labels,
                              buckets=_LATENCY_BUCKETS, registry=reg)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between output steps.", labels,
                             buckets=_LATENCY_BUCKETS, registry=reg)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Arrival to finish.", labels,
                             buckets=_LATENCY_BUCKETS, registry=reg)
        self.queue_time = Histogram(PREFIX + "request_queue_time_seconds", "Arrival to first scheduling.",
                                    labels, buckets=_LATENCY_BUCKETS, registry=reg)
        self.req_prompt_tokens = Histogram(PREFIX + "request_prompt_tokens", "Prompt length per request.",
                                           labels, buckets=_TOKEN_BUCKETS, registry=reg)
        self.req_generation_tokens = Histogram(PREFIX + "request_generation_tokens",
                                               "Generated tokens per request.", labels,
                                               buckets=_TOKEN_BUCKETS, registry=reg)
        self.registry.register(_EngineCollector(stats, model_name))
        self.vllm = VllmRequestMetrics(self.registry, model_name, max_model_len)
        self.registry.register(VllmEngineCollector(stats, model_name, cache_info))
        self._init_labels()
        self._progress: dict[str, _Progress] = {}
        self._lock = threading.Lock()

    def _init_labels(self) -> None:
        """Export every series from the start (zero), not only after its first event."""
        for metric in (self.prompt_tokens, self.generation_tokens, self.ttft, self.itl, self.e2e,
                       self.queue_time, self.req_prompt_tokens, self.req_generation_tokens):
            metric.labels(self.model_name)
        for reason in ("stop", "length", "abort"):
            self.request_success.labels(self.model_name, reason)

    # ------------------------------------------------------- StatsListener
    def record_step(self, outputs: list[RequestOutput], now: float) -> None:
        with self._lock:
            for out in outputs:
                self._record_output(out, now)
            step_tokens = self._stats().get("step_num_tokens", 0)
            if step_tokens:
                self.vllm.iteration_tokens.observe(step_tokens)

    def record_abort(self, request_id: str) -> None:
        with self._lock:
            if self._progress.pop(request_id, None) is not None:
                self.request_success.labels(self.model_name, "abort").inc()
                self.vllm.count_abort()

    def record_params(self, n: int, max_tokens: int | None) -> None:
        """An admitted request's `n` and `max_tokens` (vLLM's request_params_* histograms)."""
        with self._lock:
            self.vllm.observe_params(n, max_tokens)

    def _record_output(self, out: RequestOutput, now: float) -> None:
        progress = self._progress.setdefault(out.request_id, _Progress())
        tokens = sum(len(c.token_ids) for c in out.outputs)
        new = tokens - progress.tokens
        if new > 0:
            self._record_tokens(out, progress, new, now)
        progress.tokens = tokens
        if out.finished:
            self._record_finish(out, now)
            self._progress.pop(out.request_id, None)

    def _record_tokens(self, out: RequestOutput, progress: _Progress, new: int, now: float) -> None:
        name = self.model_name
        self.generation_tokens.labels(name).inc(new)
        self.vllm.generation_tokens.inc(new)
        if progress.last_token_time is None:
            self.prompt_tokens.labels(name).inc(len(out.prompt_token_ids))
            self.vllm.prompt_tokens.inc(len(out.prompt_token_ids))
            self.req_prompt_tokens.labels(name).observe(len(out.prompt_token_ids))
            arrival = out.metrics.arrival_time if out.metrics is not None else now
            self.ttft.labels(name).observe(max(0.0, now - arrival))
            self.vllm.ttft.observe(max(0.0, now - arrival))
            if out.metrics is not None and out.metrics.time_in_queue is not None:
                self.queue_time.labels(name).observe(out.metrics.time_in_queue)
        else:
            self.itl.labels(name).observe(now - progress.last_token_time)
            self.vllm.tpot.observe(now - progress.last_token_time)
            self.vllm.itl.observe(now - progress.last_token_time)
        progress.last_token_time = now

    def _record_finish(self, out: RequestOutput, now: float) -> None:
        name = self.model_name
        reasons = {c.finish_reason or "unknown" for c in out.outputs}
        for reason in reasons:
            self.request_success.labels(name, reason).inc()
        self.req_generation_tokens.labels(name).observe(sum(len(c.token_ids) for c in out.outputs))
        if out.metrics is not None:
            self.e2e.labels(name).observe(max(0.0, now - out.metrics.arrival_time))
        self.vllm.observe_finished(_finished_request(out, now))

    # -------------------------------------------------------------- export
    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _finished_request(out: RequestOutput, now: float) -> FinishedRequest:
    """Phase times as vLLM defines them: queued = arrival -> first scheduled, prefill = scheduled -> first
    token, decode = first -> last token, inference = scheduled -> last token (0 for a phase never reached)."""
    m = out.metrics
    arrival = m.arrival_time if m is not None else now
    scheduled = (m.first_scheduled_time if m is not None else None) or arrival
    first = (m.first_token_time if m is not None else None) or scheduled
    last = (m.last_token_time if m is not None else None) or first
    return FinishedRequest(finish_reasons=[c.finish_reason or "unknown" for c in out.outputs],
                           e2e_latency=max(0.0, now - arrival), queued_time=max(0.0, scheduled - arrival),
                           prefill_time=max(0.0, first - scheduled), decode_time=max(0.0, last - first),
                           inference_time=max(0.0, last - scheduled), num_prompt_tokens=len(out.prompt_token_ids),
                           num_generation_tokens=sum(len(c.token_ids) for c in out.outputs))
