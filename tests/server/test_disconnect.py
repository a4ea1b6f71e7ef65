"""Client disconnects (streaming and not) abort the request and free its KV blocks; real uvicorn in a thread."""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator

import httpx
import pytest
import uvicorn

from ascend_llm.engine.async_engine import AsyncLLMEngine
from ascend_llm.server.app import build_app
from tests.server.conftest import make_engine, server_args

LONG = {"prompt": "The quick brown fox", "max_tokens": 200, "ignore_eos": True, "temperature": 0.0}


@contextlib.contextmanager
def serve_in_thread(app) -> Iterator[str]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def _wait_idle(llm, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    bm = llm.scheduler.block_manager
    while llm.requests or llm.scheduler.num_running or bm.num_free_blocks != bm.num_blocks:
        assert time.monotonic() < deadline, (len(llm.requests), llm.scheduler.num_running, bm.num_free_blocks)
        time.sleep(0.02)


def _gauge(base: str, name: str) -> float:
    text = httpx.get(f"{base}/metrics").text
    line = next(ln for ln in text.splitlines() if ln.startswith(f"ascend_llm:{name}{{"))
    return float(line.rsplit(" ", 1)[1])


@pytest.fixture()
def slow_server(tiny_llama_dir):
    """A server whose steps take >= 10 ms, so a 200-token request lasts >= 2 s."""
    llm = make_engine(tiny_llama_dir)
    real_step = llm.step

    def slow_step():
        time.sleep(0.01)
        return real_step()

    llm.step = slow_step
    app = build_app(AsyncLLMEngine(llm), server_args(tiny_llama_dir))
    with serve_in_thread(app) as base:
        yield base, llm


def test_stream_disconnect_aborts_and_frees_kv(slow_server):
    base, llm = slow_server
    with httpx.Client(base_url=base, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as resp:
            lines = resp.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(ln.startswith("data: {") for ln in got)
            assert llm.scheduler.num_running == 1 and _gauge(base, "kv_cache_usage_perc") > 0
    _wait_idle(llm)
    assert _gauge(base, "num_requests_running") == 0 and _gauge(base, "kv_cache_usage_perc") == 0
    text = httpx.get(f"{base}/metrics").text
    assert 'ascend_llm:request_success_total{finished_reason="abort",model_name="tiny"} 1.0' in text


def test_non_stream_disconnect_aborts(slow_server):
    base, llm = slow_server
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}/v1/completions", json=LONG, timeout=httpx.Timeout(30, read=0.5))
    _wait_idle(llm)
    assert _gauge(base, "kv_cache_usage_perc") == 0


def test_disconnect_does_not_disturb_the_rest_of_the_batch(slow_server):
    base, llm = slow_server
    body = {**LONG, "max_tokens": 40}
    solo = httpx.post(f"{base}/v1/completions", json=body, timeout=30).json()["choices"][0]["text"]
    results: list[str] = []

    def complete():
        results.append(httpx.post(f"{base}/v1/completions", json=body, timeout=30).json()["choices"][0]["text"])

    workers = [threading.Thread(target=complete) for _ in range(2)]
    with httpx.Client(base_url=base, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
            for w in workers:
                w.start()
            lines = resp.iter_lines()
            for _ in range(4):
                next(lines)
    for w in workers:
        w.join(30)
    assert results == [solo, solo]
    _wait_idle(llm)
