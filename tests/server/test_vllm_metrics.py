"""vLLM's Prometheus series next to ours: names, label sets and buckets as in vLLM's
vllm/v1/metrics/loggers.py (PrometheusStatLogger), values checked after real requests."""
from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import MAX_MODEL_LEN, MODEL

LABELS = {"model_name": MODEL, "engine": "0"}
# vllm/v1/metrics/loggers.py: time_to_first_token_seconds and request latency buckets
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0]
LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0]
EXPECTED = {   # family -> type, as vLLM declares them
    "vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge", "vllm:gpu_cache_usage_perc": "gauge",
    "vllm:prefix_cache_queries": "counter", "vllm:prefix_cache_hits": "counter", "vllm:num_preemptions": "counter",
    "vllm:prompt_tokens": "counter", "vllm:generation_tokens": "counter", "vllm:request_success": "counter",
    "vllm:iteration_tokens_total": "histogram", "vllm:request_params_n": "histogram",
    "vllm:request_params_max_tokens": "histogram", "vllm:request_prompt_tokens": "histogram",
    "vllm:request_generation_tokens": "histogram", "vllm:time_to_first_token_seconds": "histogram",
    "vllm:time_per_output_token_seconds": "histogram", "vllm:inter_token_latency_seconds": "histogram",
    "vllm:request_time_per_output_token_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram", "vllm:request_queue_time_seconds": "histogram",
    "vllm:request_inference_time_seconds": "histogram", "vllm:request_prefill_time_seconds": "histogram",
    "vllm:request_decode_time_seconds": "histogram", "vllm:time_per_prefill_token_request_seconds": "histogram",
    "vllm:cache_config_info": "gauge",
}


def _scrape(client) -> tuple[dict, dict]:
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    return families, samples


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted({**LABELS, **labels}.items()))), 0.0)


def _buckets(families: dict, name: str) -> list[float]:
    return [float(s.labels["le"]) for s in families[name].samples if s.name.endswith("_bucket")][:-1]


def test_vllm_series_names_labels_and_buckets(client):
    assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
    families, _ = _scrape(client)
    for name, kind in EXPECTED.items():
        assert name in families and families[name].type == kind, name
        for sample in families[name].samples:
            if name != "vllm:cache_config_info":
                assert {k: v for k, v in sample.labels.items() if k not in ("le", "finished_reason")} == LABELS
    assert _buckets(families, "vllm:time_to_first_token_seconds") == TTFT_BUCKETS
    assert _buckets(families, "vllm:e2e_request_latency_seconds") == LATENCY_BUCKETS
    assert _buckets(families, "vllm:request_params_n") == [1, 2, 5, 10, 20]
    assert _buckets(families, "vllm:request_params_max_tokens") == [1, 2, 5, 10, 20, 50, 100, 200]  # 1-2-5 to 256
    assert MAX_MODEL_LEN == 256
    info = families["vllm:cache_config_info"].samples[0]
    assert info.value == 1 and info.labels["engine"] == "0" and int(info.labels["num_gpu_blocks"]) > 0
    assert info.labels["block_size"] and info.labels["enable_prefix_caching"] in ("True", "False")
    assert "ascend_llm:generation_tokens_total" in {s.name for f in families.values() for s in f.samples}


def test_vllm_series_count_what_was_served(client):
    _, before = _scrape(client)
    completion = client.post("/v1/completions", json={"model": MODEL, "prompt": "The quick brown", "n": 2,
                                                      "max_tokens": 5, "ignore_eos": True}).json()
    chat = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                                     "max_tokens": 3, "ignore_eos": True}).json()
    _, after = _scrape(client)

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    prompt_tokens = completion["usage"]["prompt_tokens"] + chat["usage"]["prompt_tokens"]
    assert delta("vllm:generation_tokens_total") == 13
    assert delta("vllm:prompt_tokens_total") == prompt_tokens
    assert delta("vllm:request_success_total", finished_reason="length") == 3      # each of n counts
    assert delta("vllm:request_params_n_count") == 2 and delta("vllm:request_params_n_sum") == 3
    assert delta("vllm:request_params_max_tokens_sum") == 8
    assert delta("vllm:request_prompt_tokens_sum") == prompt_tokens
    assert delta("vllm:request_generation_tokens_sum") == 13
    assert delta("vllm:time_to_first_token_seconds_count") == 2
    assert delta("vllm:time_per_output_token_seconds_count") >= 6      # 4 steps after the first token + 2
    assert delta("vllm:inter_token_latency_seconds_count") == delta("vllm:time_per_output_token_seconds_count")
    assert delta("vllm:request_time_per_output_token_seconds_count") == 2
    assert delta("vllm:iteration_tokens_total_count") >= 5
    assert delta("vllm:iteration_tokens_total_sum") >= 13 - 3    # every output token but each last one is computed
    for phase in ("e2e_request_latency", "request_queue_time", "request_prefill_time", "request_decode_time",
                  "request_inference_time", "time_per_prefill_token_request"):
        assert delta(f"vllm:{phase}_seconds_count") == 2, phase
    inference = delta("vllm:request_inference_time_seconds_sum")
    assert abs(inference - delta("vllm:request_prefill_time_seconds_sum")
               - delta("vllm:request_decode_time_seconds_sum")) < 1e-6
    assert 0 < inference <= delta("vllm:e2e_request_latency_seconds_sum")
    assert _value(after, "vllm:num_requests_running") == 0 and _value(after, "vllm:num_requests_waiting") == 0
    assert _value(after, "vllm:kv_cache_usage_perc") == _value(after, "vllm:gpu_cache_usage_perc")
