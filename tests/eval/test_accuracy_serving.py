"""`serve --verify-accuracy`: the replay runs on the engine thread after load; a damaged checkpoint
is served but /health is 503 with the reason, the scores are metrics; a good one is healthy; no
reference file fails start-up naming it; without the flag nothing changes."""
from __future__ import annotations

import shutil

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from ascend_llm.engine.arg_utils import EngineArgs
from ascend_llm.engine.async_engine import AsyncLLMEngine
from ascend_llm.eval.accuracy_reference import FILE_NAME
from ascend_llm.server.accuracy import AccuracyGuard, install
from ascend_llm.server.api_server import run_server
from ascend_llm.server.app import build_app
from tests.server.conftest import server_args


def _serve(model_dir, *extra: str):
    """What run_server wires, minus uvicorn: the guard runs as the engine thread's on_load."""
    args = server_args(model_dir, "--device", "cpu", "--kv-cache-memory-gb", "0.05", "--enforce-eager", *extra)
    guard = AccuracyGuard.from_args(args, model_dir)
    engine = AsyncLLMEngine.from_engine_args(EngineArgs.from_cli_args(args),
                                             on_load=guard.check if guard else None)
    app = build_app(engine, args)
    if guard is not None:
        install(app, guard)
    return app, engine


def _metrics(client: TestClient) -> dict[str, float]:
    return {s.name: s.value for f in text_string_to_metric_families(client.get("/metrics").text)
            for s in f.samples if s.name.startswith("ascend_llm:accuracy")}


def test_damaged_checkpoint_serves_but_health_is_503(damaged_dir):
    app, engine = _serve(damaged_dir, "--verify-accuracy")
    with TestClient(app) as client:
        assert engine.wait_ready(120)
        response = client.get("/health")
        assert response.status_code == 503
        assert "accuracy guard: top-1 agreement" in response.json()["error"]["message"]
        metrics = _metrics(client)
        assert metrics["ascend_llm:accuracy_top1_agreement"] < 0.8 and metrics["ascend_llm:accuracy_ok"] == 0
        completion = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
        assert completion.status_code == 200


def test_good_checkpoint_is_healthy_and_publishes_scores(good_dir):
    app, engine = _serve(good_dir, "--verify-accuracy")
    with TestClient(app) as client:
        assert engine.wait_ready(120)
        assert client.get("/health").status_code == 200
        metrics = _metrics(client)
        assert metrics["ascend_llm:accuracy_ok"] == 1 and metrics["ascend_llm:accuracy_kl"] < 0.01
        assert 0.9 < metrics["ascend_llm:accuracy_ppl_ratio"] < 1.1


def test_no_reference_file(good_dir, tmp_path, caplog):
    bare = tmp_path / "bare"
    shutil.copytree(good_dir, bare)
    (bare / FILE_NAME).unlink()
    assert run_server(server_args(bare, "--device", "cpu", "--verify-accuracy")) == 2
    assert "--verify-accuracy" in caplog.text and "no accuracy reference in the checkpoint" in caplog.text
    app, engine = _serve(bare)                       # without the flag: served as before
    with TestClient(app) as client:
        assert engine.wait_ready(120)
        assert client.get("/health").status_code == 200 and not _metrics(client)
