"""One request never hurts its neighbours or the engine (issue: reliability).

- a client that gives up while its request is still queued for admission;
- a seed outside int64 (or whose seed + n - 1 overflows) next to an innocent request;
- a failure while sampling one request, and NaN logits in one row of a batch.
Each case checks the bad request gets a clear error, the others the tokens they get alone,
and the engine stays healthy with every KV block free.
"""
from __future__ import annotations

import asyncio
import threading
import time

import httpx
import torch

from ascend_llm.engine import model_runner as model_runner_module
from ascend_llm.engine.async_engine import AsyncLLMEngine, EngineState
from ascend_llm.layers import isolated_sampling
from ascend_llm.sampling_params import SamplingParams
from ascend_llm.server.app import build_app
from tests.server.conftest import make_engine, server_args

GOOD = {"prompt": "The quick brown fox", "max_tokens": 24, "ignore_eos": True, "temperature": 0.0}
POISON = {**GOOD, "prompt": "Full fathom five"}
RANDOM = {"prompt": "Full fathom five", "max_tokens": 24, "ignore_eos": True, "temperature": 0.8,
          "seed": 7}


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


def _client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60)


def _assert_engine_clean(llm) -> None:
    """Nothing left in the engine: no request, no sequence, every KV block free."""
    assert not llm.requests
    assert llm.scheduler.num_running == 0 and llm.scheduler.num_waiting == 0
    bm = llm.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks


async def _complete(c: httpx.AsyncClient, body: dict) -> httpx.Response:
    return await c.post("/v1/completions", json=body)


def test_clients_that_time_out_while_queued_do_not_kill_the_engine(tiny_llama_dir):
    """The reported crash: admission futures cancelled by client time-outs were later resolved
    by the engine thread (asyncio.InvalidStateError), which failed the engine for good.

    The engine thread is held inside a step until all 24 clients have given up, so every one of
    them times out while queued (no race with the host's speed); then it drains their commands."""
    llm = make_engine(tiny_llama_dir)
    real_step = llm.step
    in_step, release = threading.Event(), threading.Event()

    def gated_step():                      # commands queue up while a step is held
        in_step.set()
        release.wait(30)
        return real_step()

    llm.step = gated_step
    engine = AsyncLLMEngine(llm)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

    async def impatient(i: int, timeout: float) -> str:
        try:
            await asyncio.wait_for(engine.add_request(f"impatient-{i}", "hello there", params), timeout)
        except asyncio.TimeoutError:
            return "timed out"
        engine.abort(f"impatient-{i}")     # admitted in time: the client leaves anyway
        return "admitted"

    async def scenario():
        busy = await engine.add_request("busy", "The quick brown fox", params)
        assert await asyncio.to_thread(in_step.wait, 30)
        queued = await asyncio.gather(*(impatient(i, 0.05) for i in range(24)))
        release.set()
        admitted = await asyncio.gather(*(impatient(24 + i, 30) for i in range(4)))
        while not (item := await busy.get()).finished:
            pass
        after = [out async for out in engine.generate("after", "The quick brown fox", params)]
        return queued, admitted, after

    try:
        queued, admitted, after = _run(scenario())
        deadline = time.monotonic() + 10
        while llm.requests and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.state is EngineState.READY and engine.health() == (True, "ok")
        assert queued == ["timed out"] * 24 and admitted == ["admitted"] * 4
        assert after[-1].finished and len(after[-1].outputs[0].token_ids) == 8
        assert engine.num_pending_requests == 0
        _assert_engine_clean(llm)
    finally:
        release.set()
        engine.shutdown(timeout=1)


def test_out_of_range_seed_is_a_400_and_spares_its_neighbour(tiny_llama_dir):
    llm = make_engine(tiny_llama_dir)
    engine = AsyncLLMEngine(llm)
    app = build_app(engine, server_args(tiny_llama_dir))
    bad_seeds = [{**RANDOM, "seed": 2 ** 63}, {**RANDOM, "seed": -(2 ** 63) - 1},
                 {**RANDOM, "seed": 2 ** 63 - 1, "n": 2}]

    async def scenario():
        async with _client(app) as c:
            alone = await _complete(c, RANDOM)
            innocent = asyncio.create_task(_complete(c, RANDOM))
            bad = [await _complete(c, body) for body in bad_seeds]
            return alone, await innocent, bad, await _complete(c, RANDOM)

    try:
        alone, innocent, bad, after = _run(scenario())
    finally:
        engine.shutdown(timeout=1)
    for response in bad:
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "seed"
    assert "seed + n - 1" in bad[2].json()["error"]["message"]
    assert alone.status_code == innocent.status_code == after.status_code == 200
    expected = alone.json()["choices"][0]["text"]
    assert innocent.json()["choices"][0]["text"] == expected == after.json()["choices"][0]["text"]
    _assert_engine_clean(llm)


def _fail_sampling_of(monkeypatch, is_bad) -> None:
    """Make building the sampling state raise whenever a row's sequence is_bad(seq)."""
    real_build = isolated_sampling.SamplingMetadata.build

    def build(seqs, *args, **kwargs):
        if any(is_bad(seq) for seq in seqs):
            raise RuntimeError("injected sampler failure")
        return real_build(seqs, *args, **kwargs)

    monkeypatch.setattr(isolated_sampling.SamplingMetadata, "build", build)


def _nan_logits_for(monkeypatch, is_bad) -> None:
    """Make the logits rows of sequences with is_bad(seq) NaN before sampling."""
    real_sample = model_runner_module.sample_isolated

    def sample(sampler, logits, seqs, *args):
        logits = logits.clone()
        for row, seq in enumerate(seqs):
            if is_bad(seq):
                logits[row] = float("nan")
        return real_sample(sampler, logits, seqs, *args)

    monkeypatch.setattr(model_runner_module, "sample_isolated", sample)


def _poisoned_batch(tiny_llama_dir, monkeypatch, poison) -> tuple:
    """Three good requests (greedy and seeded) batched with one poisoned; their outputs alone."""
    llm = make_engine(tiny_llama_dir)
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=12, temperature=0.9, seed=3, ignore_eos=True, logprobs=2)
    alone = {p.temperature: _generate(llm, {"solo": ("The quick brown fox", p)})["solo"]
             for p in (greedy, seeded)}
    poison(monkeypatch, lambda seq: seq.request_id == "bad")
    batch = {"good-g": ("The quick brown fox", greedy), "bad": ("Full fathom five", seeded),
             "good-s": ("The quick brown fox", seeded)}
    return llm, alone, _generate(llm, batch)


def _generate(llm, requests: dict) -> dict:
    for request_id, (prompt, params) in requests.items():
        llm.add_request(request_id, prompt, params)
    finals = {}
    while llm.has_unfinished_requests():
        finals.update({out.request_id: out for out in llm.step() if out.finished})
    return finals


def test_a_sampling_failure_fails_only_that_request(tiny_llama_dir, monkeypatch):
    llm, alone, finals = _poisoned_batch(tiny_llama_dir, monkeypatch, _fail_sampling_of)
    bad = finals["bad"]
    assert bad.finished and bad.outputs[0].finish_reason == "error"
    assert "injected sampler failure" in bad.error
    assert finals["good-g"].outputs[0].token_ids == alone[0.0].outputs[0].token_ids
    assert finals["good-s"].outputs[0].token_ids == alone[0.9].outputs[0].token_ids
    assert finals["good-g"].error is None and finals["good-s"].outputs[0].finish_reason == "length"
    _assert_engine_clean(llm)


def test_nan_logits_in_one_row_fail_only_that_request(tiny_llama_dir, monkeypatch):
    llm, alone, finals = _poisoned_batch(tiny_llama_dir, monkeypatch, _nan_logits_for)
    bad = finals["bad"]
    assert bad.outputs[0].finish_reason == "error" and "non-finite logits" in bad.error
    assert bad.outputs[0].token_ids == []
    assert finals["good-g"].outputs[0].token_ids == alone[0.0].outputs[0].token_ids
    good_s, solo_s = finals["good-s"].outputs[0], alone[0.9].outputs[0]
    assert good_s.token_ids == solo_s.token_ids
    assert torch.allclose(torch.tensor(good_s.cumulative_logprob), torch.tensor(solo_s.cumulative_logprob))
    _assert_engine_clean(llm)


def test_server_answers_500_for_the_failed_request_and_200_for_the_rest(tiny_llama_dir, monkeypatch):
    llm = make_engine(tiny_llama_dir)
    poison = llm.tokenizer.encode(POISON["prompt"], add_special_tokens=True)
    _nan_logits_for(monkeypatch, lambda seq: seq.prompt_token_ids == poison)
    engine = AsyncLLMEngine(llm)
    app = build_app(engine, server_args(tiny_llama_dir))

    async def scenario():
        async with _client(app) as c:
            good = [asyncio.create_task(_complete(c, GOOD)) for _ in range(3)]
            bad = asyncio.create_task(_complete(c, POISON))
            async with c.stream("POST", "/v1/completions", json={**POISON, "stream": True}) as response:
                streamed = [line async for line in response.aiter_lines() if line.startswith("data: ")]
            return await asyncio.gather(*good), await bad, streamed, await _complete(c, GOOD)

    try:
        good, bad, streamed, after = _run(scenario())
        health_ok = engine.health() == (True, "ok")
    finally:
        engine.shutdown(timeout=1)
    assert [r.status_code for r in good] == [200, 200, 200] and after.status_code == 200
    assert len({r.json()["choices"][0]["text"] for r in good + [after]}) == 1
    assert bad.status_code == 500 and "non-finite logits" in bad.json()["error"]["message"]
    assert "non-finite logits" in streamed[-2] and streamed[-1] == "data: [DONE]"
    assert health_ok
    _assert_engine_clean(llm)
