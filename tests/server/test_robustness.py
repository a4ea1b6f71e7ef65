"""Admission and failure isolation: overload 429, loading / draining / stalled 503, step failures."""
from __future__ import annotations

import asyncio
import threading
import time

import httpx
from fastapi.testclient import TestClient

from ascend_llm.engine.async_engine import AsyncLLMEngine
from ascend_llm.server.app import build_app
from tests.server.conftest import make_engine, server_args

LONG = {"prompt": "The quick brown fox", "max_tokens": 200, "ignore_eos": True, "temperature": 0.0}
SHORT = {"prompt": "The quick brown fox", "max_tokens": 4, "ignore_eos": True, "temperature": 0.0}


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=60))


async def _wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def _client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=30)


def test_overload_gets_429_quickly_and_admitted_requests_finish(tiny_llama_dir):
    engine = AsyncLLMEngine(make_engine(tiny_llama_dir), max_pending_requests=2)
    app = build_app(engine, server_args(tiny_llama_dir))

    async def scenario():
        async with _client(app) as c:
            running = [asyncio.create_task(c.post("/v1/completions", json=LONG)) for _ in range(2)]
            await _wait_until(lambda: engine.num_pending_requests == 2)
            t0 = time.monotonic()
            rejected = await c.post("/v1/completions", json=SHORT)
            elapsed = time.monotonic() - t0
            done = await asyncio.gather(*running)
            after = await c.post("/v1/completions", json=SHORT)
            return rejected, elapsed, done, after

    try:
        rejected, elapsed, done, after = _run(scenario())
    finally:
        engine.shutdown(timeout=1)
    assert rejected.status_code == 429 and rejected.json()["error"]["code"] == 429
    assert rejected.headers["retry-after"] == "1" and elapsed < 1.0
    assert [r.status_code for r in done] == [200, 200]
    assert all(r.json()["usage"]["completion_tokens"] == 200 for r in done)
    assert after.status_code == 200


def test_health_is_503_while_loading(tiny_llama_dir):
    release = threading.Event()

    def slow_factory():
        release.wait(30)
        return make_engine(tiny_llama_dir)

    engine = AsyncLLMEngine(engine_factory=slow_factory)
    app = build_app(engine, server_args(tiny_llama_dir))
    with TestClient(app) as c:
        loading = c.get("/health")
        assert loading.status_code == 503 and "loading" in loading.json()["error"]["message"]
        assert c.get("/v1/models").status_code == 503
        assert c.post("/v1/completions", json=SHORT).status_code == 503
        release.set()
        assert engine.wait_ready(30)
        assert c.get("/health").status_code == 200
        assert c.post("/v1/completions", json=SHORT).status_code == 200


def test_failed_load_reports_unhealthy(tiny_llama_dir):
    def broken():
        raise RuntimeError("weights are corrupt")

    fatal: list[str] = []
    engine = AsyncLLMEngine(engine_factory=broken)
    engine.on_fatal = fatal.append
    app = build_app(engine, server_args(tiny_llama_dir))
    with TestClient(app) as c:
        engine.wait_ready(10)
        resp = c.get("/health")
        assert resp.status_code == 503 and "weights are corrupt" in resp.json()["error"]["message"]
        assert c.post("/v1/completions", json=SHORT).status_code == 503
    assert fatal and "weights are corrupt" in fatal[0]


def test_health_is_503_when_engine_stalls(tiny_llama_dir):
    llm = make_engine(tiny_llama_dir)
    engine = AsyncLLMEngine(llm, stall_timeout_s=0.3)
    real_step, stuck = llm.step, threading.Event()

    def slow_step():
        if not stuck.is_set():
            stuck.set()
            time.sleep(1.5)
        return real_step()

    llm.step = slow_step
    app = build_app(engine, server_args(tiny_llama_dir))

    async def scenario():
        async with _client(app) as c:
            request = asyncio.create_task(c.post("/v1/completions", json=SHORT))
            await _wait_until(stuck.is_set)
            await asyncio.sleep(0.6)
            during = await c.get("/health")
            done = await request
            after = await c.get("/health")
            return during, done, after

    try:
        during, done, after = _run(scenario())
    finally:
        engine.shutdown(timeout=1)
    assert during.status_code == 503 and "no progress" in during.json()["error"]["message"]
    assert done.status_code == 200 and after.status_code == 200


def test_step_failure_fails_in_flight_requests_and_server_recovers(tiny_llama_dir):
    llm = make_engine(tiny_llama_dir)
    engine = AsyncLLMEngine(llm)
    real_step, calls = llm.step, {"n": 0}

    def flaky_step():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("device error")
        return real_step()

    llm.step = flaky_step
    app = build_app(engine, server_args(tiny_llama_dir))
    with TestClient(app) as c:
        failed = c.post("/v1/completions", json=LONG)
        assert failed.status_code == 500 and "device error" in failed.json()["error"]["message"]
        assert llm.scheduler.num_running == 0 and not llm.requests
        ok = c.post("/v1/completions", json=SHORT)
        assert ok.status_code == 200 and c.get("/health").status_code == 200


def test_one_rejected_request_does_not_affect_the_batch(tiny_llama_dir):
    llm = make_engine(tiny_llama_dir)
    engine = AsyncLLMEngine(llm)
    real_add = llm.add_request

    def picky_add(request_id, prompt, params, prompt_token_ids=None, arrival_time=None):
        if prompt == "poison":
            raise ValueError("prompt: rejected by the engine")
        return real_add(request_id, prompt, params, prompt_token_ids, arrival_time)

    llm.add_request = picky_add
    app = build_app(engine, server_args(tiny_llama_dir))

    async def scenario():
        async with _client(app) as c:
            solo = await c.post("/v1/completions", json={**SHORT, "max_tokens": 12})
            bodies = [{**SHORT, "max_tokens": 12}] * 3 + [{**SHORT, "prompt": "poison"}]
            results = await asyncio.gather(*(c.post("/v1/completions", json=b) for b in bodies))
            return solo, results

    try:
        solo, results = _run(scenario())
    finally:
        engine.shutdown(timeout=1)
    assert [r.status_code for r in results] == [200, 200, 200, 400]
    assert results[3].json()["error"]["param"] == "prompt"
    expected = solo.json()["choices"][0]["text"]
    assert all(r.json()["choices"][0]["text"] == expected for r in results[:3])


def test_draining_rejects_new_requests_with_503(tiny_llama_dir):
    engine = AsyncLLMEngine(make_engine(tiny_llama_dir))
    app = build_app(engine, server_args(tiny_llama_dir))
    with TestClient(app) as c:
        assert c.post("/v1/completions", json=SHORT).status_code == 200
        engine.begin_drain()
        resp = c.post("/v1/completions", json=SHORT)
        assert resp.status_code == 503 and resp.json()["error"]["code"] == 503
        assert c.get("/health").status_code == 503
