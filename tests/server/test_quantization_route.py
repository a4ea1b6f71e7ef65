"""`GET /v1/quantization` and the audit's Prometheus series on a server over a wint8 tiny model
(`--quantization wint8`: online per-channel int8 weights, which the CPU backend runs by
dequantizing, so every quantized layer is reported off a native kernel)."""
from __future__ import annotations

from typing import Iterator

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from ascend_llm.engine.async_engine import AsyncLLMEngine
from ascend_llm.server.app import build_app
from tests.server.conftest import make_engine, server_args


@pytest.fixture(scope="module")
def wint8_client(tiny_llama_dir) -> Iterator[TestClient]:
    engine = AsyncLLMEngine(make_engine(tiny_llama_dir, quantization="wint8"))
    with TestClient(build_app(engine, server_args(tiny_llama_dir))) as client:
        yield client


def test_quantization_route_lists_every_layer(wint8_client):
    response = wint8_client.get("/v1/quantization")
    assert response.status_code == 200
    body = response.json()
    assert body["backend"] == "cpu"
    layers = {layer["layer"]: layer for layer in body["layers"]}
    down = layers["model.layers.0.mlp.down_proj"]
    assert down["scheme"] == "wint8" and down["path"] == "dequantize"
    assert down["kernels"][0]["op"] == "weight_only_matmul" and down["bytes"] > 0
    assert layers["lm_head"]["scheme"] == "FLOAT"
    assert body["summary"].startswith(f"{len(layers)} layers: ")
    assert len(body["not_native"]) == sum(1 for layer in layers.values() if layer["scheme"] != "FLOAT")


def test_audit_metrics(wint8_client):
    families = {f.name: f for f in text_string_to_metric_families(wint8_client.get("/metrics").text)}
    samples = families["ascend_llm:quant_layers"].samples
    by_scheme = {s.labels["scheme"]: s for s in samples}
    assert by_scheme["wint8"].labels["path"] == "dequantize" and by_scheme["wint8"].value >= 4
    assert by_scheme["FLOAT"].labels["kernel"].startswith("cpu.")
    fallbacks = families["ascend_llm:quant_kernel_fallbacks"].samples
    assert [s.value for s in fallbacks if s.name.endswith("_total")] == [0.0]
