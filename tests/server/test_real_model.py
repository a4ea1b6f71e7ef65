"""The bundled default model (SmolLM2) behind the app: `ascend-llm serve` with no arguments works."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from ascend_llm.engine.arg_utils import EngineArgs
from ascend_llm.engine.async_engine import AsyncLLMEngine
from ascend_llm.server.app import build_app
from ascend_llm.server.args import make_parser


@pytest.mark.slow
def test_default_model_answers_a_chat_question():
    args = make_parser().parse_args(["--max-model-len", "512", "--kv-cache-memory-gb", "0.1"])
    engine = AsyncLLMEngine.from_engine_args(EngineArgs.from_cli_args(args))
    with TestClient(build_app(engine, args)) as client:
        assert engine.wait_ready(300)
        data = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 16, "temperature": 0}).json()
        assert "Paris" in data["choices"][0]["message"]["content"]
        assert data["model"] == EngineArgs().model
