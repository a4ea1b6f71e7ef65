"""vLLM's Prometheus series (`vllm:*`, labels `model_name` and `engine`), so dashboards and alerts
written for vLLM work unchanged. Names, label sets and buckets follow vllm/v1/metrics/loggers.py."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

PREFIX = "vllm:"
ENGINE = "0"        # one engine core per server: vLLM labels it "0"
FINISH_REASONS = ("stop", "length", "abort")

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
PREFILL_TOKEN_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
N_BUCKETS = (1, 2, 5, 10, 20)


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to `max_value` (vLLM's token-count buckets)."""
    buckets, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return buckets
            buckets.append(mantissa * scale)
        scale *= 10


@dataclass
class FinishedRequest:
    """One finished request's phase times (seconds) and sizes, as vLLM's FinishedRequestStats."""
    finish_reasons: list[str]       # one per choice: vLLM counts each of n outputs as a request
    e2e_latency: float
    queued_time: float
    prefill_time: float
    decode_time: float
    inference_time: float
    num_prompt_tokens: int
    num_generation_tokens: int


class VllmEngineCollector(Collector):
    """vLLM's scheduler gauges and cache counters, plus `cache_config_info`, read at scrape time."""

    def __init__(self, stats: Callable[[], dict[str, Any]], model_name: str,
                 cache_info: Callable[[], dict[str, str] | None]) -> None:
        self._stats = stats
        self._cache_info = cache_info
        self._labels = {"model_name": model_name, "engine": ENGINE}

    def collect(self) -> Iterator[Any]:
        stats = self._stats()
        usage = stats.get("kv_cache_usage", 0.0)
        yield self._family(GaugeMetricFamily, "num_requests_running", "Number of requests in model execution "
                           "batches.", stats.get("num_running", 0))
        yield self._family(GaugeMetricFamily, "num_requests_waiting", "Number of requests waiting to be "
                           "processed.", stats.get("num_waiting", 0))
        yield self._family(GaugeMetricFamily, "kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                           usage)
        yield self._family(GaugeMetricFamily, "gpu_cache_usage_perc", "GPU KV-cache usage. 1 means 100 percent "
                           "usage. DEPRECATED: Use vllm:kv_cache_usage_perc instead.", usage)
        for name in ("prefix_cache_queries", "gpu_prefix_cache_queries"):
            yield self._family(CounterMetricFamily, name, "Prefix cache queries, in terms of number of queried "
                               "tokens.", stats.get("prefix_queries_tokens", 0))
        for name in ("prefix_cache_hits", "gpu_prefix_cache_hits"):
            yield self._family(CounterMetricFamily, name, "Prefix cache hits, in terms of number of cached "
                               "tokens.", stats.get("prefix_hit_tokens", 0))
        yield self._family(CounterMetricFamily, "num_preemptions", "Cumulative number of preemption from the "
                           "engine.", stats.get("num_preemptions", 0))
        yield self._family(CounterMetricFamily, "spec_decode_num_draft_tokens", "Number of draft tokens.",
                           stats.get("spec_decode_num_draft_tokens", 0))
        yield self._family(CounterMetricFamily, "spec_decode_num_accepted_tokens", "Number of accepted tokens.",
                           stats.get("spec_decode_num_accepted_tokens", 0))
        info = self._cache_info()
        if info is not None:      # an info metric: a gauge fixed at 1 whose labels carry the configuration
            labels = {**info, "engine": ENGINE}
            family = GaugeMetricFamily(PREFIX + "cache_config_info", "Information of the LLMEngine CacheConfig",
                                       labels=list(labels))
            family.add_metric(list(labels.values()), 1.0)
            yield family

    def _family(self, cls: type, name: str, doc: str, value: float) -> Any:
        family = cls(PREFIX + name, doc, labels=list(self._labels))
        family.add_metric(list(self._labels.values()), float(value))
        return family


class VllmRequestMetrics:
    """vLLM's per-step and per-request series (counters and histograms), fed by ServerMetrics."""

    def __init__(self, registry: CollectorRegistry, model_name: str, max_model_len: int) -> None:
        labels = ["model_name", "engine"]
        self._values = (model_name, ENGINE)
        tokens = build_1_2_5_buckets(max_model_len)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, doc, labels + list(extra), registry=registry)

        def histogram(name: str, doc: str, buckets: Any) -> Any:
            return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=registry).labels(*self._values)

        self.prompt_tokens = counter("prompt_tokens", "Number of prefill tokens processed.").labels(*self._values)
        self.generation_tokens = counter("generation_tokens", "Number of generation tokens processed.") \
            .labels(*self._values)
        self._success = counter("request_success", "Count of successfully processed requests.",
                                ("finished_reason",))
        for reason in FINISH_REASONS:
            self._success.labels(*self._values, reason)
        self.iteration_tokens = histogram("iteration_tokens_total", "Histogram of number of tokens per "
                                          "engine_step.", ITERATION_TOKEN_BUCKETS)
        self.params_n = histogram("request_params_n", "Histogram of the n request parameter.", N_BUCKETS)
        self.params_max_tokens = histogram("request_params_max_tokens", "Histogram of the max_tokens request "
                                           "parameter.", tokens)
        self.request_prompt_tokens = histogram("request_prompt_tokens", "Number of prefill tokens processed.",
                                               tokens)
        self.request_generation_tokens = histogram("request_generation_tokens", "Number of generation tokens "
                                                   "processed.", tokens)
        self.ttft = histogram("time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              TTFT_BUCKETS)
        self.tpot = histogram("time_per_output_token_seconds", "Histogram of time per output token in seconds.",
                              TPOT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             TPOT_BUCKETS)
        self.request_tpot = histogram("request_time_per_output_token_seconds", "Histogram of time_per_output_token"
                                      "_seconds per request.", TPOT_BUCKETS)   # newer vLLM: per-request mean
        self.prefill_per_token = histogram("time_per_prefill_token_request_seconds", "Time spent per token "
                                           "during prefill phase in seconds", PREFILL_TOKEN_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             REQUEST_LATENCY_BUCKETS)
        self.queue = histogram("request_queue_time_seconds", "Histogram of time spent in WAITING phase for "
                               "request.", REQUEST_LATENCY_BUCKETS)
        self.inference = histogram("request_inference_time_seconds", "Histogram of time spent in RUNNING phase "
                                   "for request.", REQUEST_LATENCY_BUCKETS)
        self.prefill = histogram("request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for "
                                 "request.", REQUEST_LATENCY_BUCKETS)
        self.decode = histogram("request_decode_time_seconds", "Histogram of time spent in DECODE phase for "
                                "request.", REQUEST_LATENCY_BUCKETS)

    def observe_params(self, n: int, max_tokens: int | None) -> None:
        self.params_n.observe(n)
        if max_tokens:
            self.params_max_tokens.observe(max_tokens)

    def observe_finished(self, req: FinishedRequest) -> None:
        for reason in req.finish_reasons:
            self._success.labels(*self._values, reason).inc()
        self.e2e.observe(req.e2e_latency)
        self.queue.observe(req.queued_time)
        self.prefill.observe(req.prefill_time)
        if req.num_prompt_tokens > 0:
            self.prefill_per_token.observe(req.prefill_time / req.num_prompt_tokens)
        self.inference.observe(req.inference_time)
        self.decode.observe(req.decode_time)
        if req.num_generation_tokens > 1:
            self.request_tpot.observe(req.decode_time / (req.num_generation_tokens - 1))
        self.request_prompt_tokens.observe(req.num_prompt_tokens)
        self.request_generation_tokens.observe(req.num_generation_tokens)

    def count_abort(self) -> None:
        self._success.labels(*self._values, "abort").inc()
