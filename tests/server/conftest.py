"""Server fixtures: a tiny-model engine behind the app, driven with FastAPI's TestClient."""
from __future__ import annotations

from typing import Any, Iterator

import pytest
from fastapi.testclient import TestClient

from ascend_llm.engine.arg_utils import EngineArgs
from ascend_llm.engine.async_engine import AsyncLLMEngine
from ascend_llm.engine.llm_engine import LLMEngine
from ascend_llm.server.app import build_app
from ascend_llm.server.args import make_parser

MODEL = "tiny"
MAX_MODEL_LEN = 256


def make_engine(model_dir: Any, **overrides: Any) -> LLMEngine:
    kwargs = dict(model=str(model_dir), max_model_len=MAX_MODEL_LEN, served_model_name=MODEL, device="cpu",
                  max_num_seqs=16, kv_cache_memory_gb=0.05)
    kwargs.update(overrides)
    return LLMEngine(EngineArgs(**kwargs))


def server_args(model_dir: Any, *extra: str):
    return make_parser().parse_args(["--model", str(model_dir), "--served-model-name", MODEL, *extra])


@pytest.fixture(scope="module")
def engine(tiny_llama_dir) -> AsyncLLMEngine:
    return AsyncLLMEngine(make_engine(tiny_llama_dir))


@pytest.fixture(scope="module")
def client(engine, tiny_llama_dir) -> Iterator[TestClient]:
    app = build_app(engine, server_args(tiny_llama_dir))
    with TestClient(app) as test_client:
        yield test_client


def sse_events(lines: Iterator[str]) -> list[Any]:
    """Parsed `data:` payloads of an SSE stream; the final [DONE] is returned as the string."""
    import json
    events = []
    for line in lines:
        if not line.startswith("data: "):
            continue
        payload = line[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def stream_events(client: TestClient, path: str, body: dict) -> list[Any]:
    with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return sse_events(response.iter_lines())
