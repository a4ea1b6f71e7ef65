"""The OpenAI server with `--speculative-config`: streamed and whole completions agree with a
server without speculation, and the draft counters appear in /metrics."""
from __future__ import annotations

import json

from fastapi.testclient import TestClient

from ascend_llm.engine.async_engine import AsyncLLMEngine
from ascend_llm.server.app import build_app
from tests.server.conftest import MODEL, make_engine, server_args, sse_events

SPEC = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}'
PROMPT = [5, 9, 14, 5, 9, 14, 5, 9, 14, 5, 9]


def completion(client: TestClient, stream: bool) -> str:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 20, "temperature": 0, "ignore_eos": True,
            "stream": stream}
    if not stream:
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]
    with client.stream("POST", "/v1/completions", json=body) as response:
        events = sse_events(response.iter_lines())
    return "".join(e["choices"][0]["text"] for e in events if isinstance(e, dict) and e["choices"])


def test_server_with_ngram_speculation(tiny_llama_dir):
    args = server_args(tiny_llama_dir, "--speculative-config", SPEC)
    spec_engine = make_engine(tiny_llama_dir, speculative_config=json.loads(SPEC))
    with TestClient(build_app(AsyncLLMEngine(make_engine(tiny_llama_dir)), server_args(tiny_llama_dir))) as plain, \
            TestClient(build_app(AsyncLLMEngine(spec_engine), args)) as spec:
        want = completion(plain, stream=False)
        assert completion(spec, stream=False) == want
        assert completion(spec, stream=True) == want
        metrics = spec.get("/metrics").text
    drafts = [line for line in metrics.splitlines()
              if line.startswith("ascend_llm:spec_decode_num_draft_tokens_total{")]
    assert drafts and float(drafts[0].rsplit(" ", 1)[1]) > 0
    assert args.speculative_config == SPEC
