"""/health, /version, /v1/models, /tokenize, /detokenize, /metrics and --api-key."""
from __future__ import annotations

import re

from fastapi.testclient import TestClient

from ascend_llm import __version__
from ascend_llm.server.app import build_app
from tests.server.conftest import MODEL, make_engine, server_args


def test_health_version_models(client):
    health = client.get("/health")
    assert health.status_code == 200 and health.content == b""
    assert client.get("/version").json() == {"version": __version__}
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    card = models["data"][0]
    assert card["id"] == MODEL and card["max_model_len"] == 256 and card["object"] == "model"


def test_tokenize_roundtrip(client, engine):
    tok = client.post("/tokenize", json={"prompt": "The quick brown fox"}).json()
    assert tok["tokens"] == engine.engine.tokenizer.encode("The quick brown fox")
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 256
    no_special = client.post("/tokenize", json={"prompt": "The quick", "add_special_tokens": False}).json()
    assert no_special["tokens"] == engine.engine.tokenizer.encode("The quick", add_special_tokens=False)
    text = client.post("/detokenize", json={"tokens": no_special["tokens"]}).json()["prompt"]
    assert text == "The quick"
    assert client.post("/tokenize", json={"model": "other", "prompt": "x"}).status_code == 404
    assert client.post("/tokenize", json={}).status_code == 400


def _metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not in metrics")


def test_metrics_count_tokens_and_latency(client):
    before = client.get("/metrics").text
    gen0 = _metric(before, "ascend_llm:generation_tokens_total", model_name=MODEL)
    ttft0 = _metric(before, "ascend_llm:time_to_first_token_seconds_count", model_name=MODEL)
    resp = client.post("/v1/completions", json={"prompt": "The quick", "max_tokens": 5, "ignore_eos": True,
                                                "n": 2})
    assert resp.status_code == 200
    text = client.get("/metrics").text
    assert text and client.get("/metrics").headers["content-type"].startswith("text/plain")
    assert _metric(text, "ascend_llm:generation_tokens_total", model_name=MODEL) == gen0 + 10
    assert _metric(text, "ascend_llm:time_to_first_token_seconds_count", model_name=MODEL) == ttft0 + 1
    assert _metric(text, "ascend_llm:inter_token_latency_seconds_count", model_name=MODEL) >= 4
    assert _metric(text, "ascend_llm:e2e_request_latency_seconds_count", model_name=MODEL) >= 1
    assert _metric(text, "ascend_llm:request_success_total", finished_reason="length") >= 1
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert _metric(text, f"ascend_llm:{gauge}", model_name=MODEL) == 0.0
    for counter in ("prefix_cache_queries_total", "prefix_cache_hits_total", "num_preemptions_total",
                    "prompt_tokens_total"):
        assert re.search(rf"^ascend_llm:{counter}\{{", text, re.M), counter


def test_prefix_cache_hits_are_counted(client):
    prompt = "Tensor parallel inference on Ascend NPUs with paged attention and continuous batching. " * 3
    for _ in range(2):
        assert client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2}).status_code == 200
    text = client.get("/metrics").text
    assert _metric(text, "ascend_llm:prefix_cache_hits_total", model_name=MODEL) >= 16


def test_api_key(tiny_llama_dir):
    app = build_app(make_engine(tiny_llama_dir), server_args(tiny_llama_dir, "--api-key", "s3cret"))
    with TestClient(app) as c:
        body = {"prompt": "The", "max_tokens": 2}
        denied = c.post("/v1/completions", json=body)
        assert denied.status_code == 401
        assert denied.json()["error"]["type"] == "authentication_error"
        assert c.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.post("/v1/completions", json=body, headers={"Authorization": "bearer s3cret"}).status_code == 401
        assert c.post("/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        for path in ("/v1/models", "/version"):
            assert c.get(path).status_code == 401
        assert c.post("/tokenize", json={"prompt": "x"}).status_code == 401
        # a spoofed Host header must not change which path is checked
        assert c.get("/v1/models", headers={"Host": "evil/health?"}).status_code == 401
        assert c.get("/health").status_code == 200
        assert c.get("/metrics").status_code == 200
