"""benchmarks/bench_soak.py without a model: the seeded workload, the client against a fake
server (completions, cancellations, every kind of failure), the summary, table and file name."""
from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_soak.py"


@pytest.fixture(scope="module")
def bench() -> Iterator[Any]:
    sys.path.insert(0, str(BENCH.parent))       # as when run as a script: its helper modules import
    spec = importlib.util.spec_from_file_location("bench_soak", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module            # dataclasses look their module up while it loads
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)
        sys.path.remove(str(BENCH.parent))


def test_workload_is_seeded_mixed_and_cancels_exactly_the_fraction(bench) -> None:
    specs = bench.make_workload(2000, 0.1, seed=3, num_words=5000)
    assert specs == bench.make_workload(2000, 0.1, seed=3, num_words=5000)
    assert specs != bench.make_workload(2000, 0.1, seed=4, num_words=5000)
    assert sum(s.cancel_after_s is not None for s in specs) == 200
    assert all(0 <= s.cancel_after_s <= bench.MAX_CANCEL_DELAY_S for s in specs if s.cancel_after_s is not None)
    assert all(8 <= s.prompt_words <= 256 and 4 <= s.max_tokens <= 128 for s in specs)
    assert all(s.offset + s.prompt_words <= 5000 for s in specs)
    assert {s.stream for s in specs} == {True, False} and {s.temperature for s in specs} == {0.0, 0.7}
    assert max(s.prompt_words for s in specs) > 128 and min(s.max_tokens for s in specs) < 16


def _sse(*events: Any) -> bytes:
    return b"".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events)


async def fake_server(request: httpx.Request) -> httpx.Response:
    """Answers by prompt: 'slow' takes 5 s, 'short' returns one token too few, 'boom' is a 500,
    'broken' streams an error event, 'cut' a stream without [DONE]; anything else is right."""
    body = json.loads(request.content)
    prompt, n = body["prompt"], body["max_tokens"]
    if prompt == "slow":
        await asyncio.sleep(5)
    if prompt == "boom":
        return httpx.Response(500, json={"error": {"message": "internal"}})
    tokens = n - 1 if prompt == "short" else n
    if not body["stream"]:
        return httpx.Response(200, json={"choices": [{"text": "x"}], "usage": {"completion_tokens": tokens}})
    chunk = {"choices": [{"text": "x"}]}
    if prompt == "broken":
        return httpx.Response(200, content=_sse(chunk, {"error": {"message": "step failed"}}, "[DONE]"))
    tail = [] if prompt == "cut" else ["[DONE]"]
    return httpx.Response(200, content=_sse(chunk, {"choices": [], "usage": {"completion_tokens": tokens}}, *tail))


def test_client_counts_completions_cancellations_and_every_failure(bench) -> None:
    cases = [("fine", True, None), ("fine", False, None), ("slow", True, 0.05), ("slow", False, 0.05),
             ("fine", False, 3.0), ("short", False, None), ("boom", True, None), ("broken", True, None),
             ("cut", True, None)]
    words = [prompt for prompt, _, _ in cases]
    specs = [bench.RequestSpec(i, 1, i, 7, stream, 0.0, cancel) for i, (_, stream, cancel) in enumerate(cases)]
    finished: list[int] = []

    async def run() -> list:
        async with httpx.AsyncClient(transport=httpx.MockTransport(fake_server), base_url="http://fake") as client:
            return await bench.run_load(client, specs, words, "m", 4, finished.append)

    results = asyncio.run(run())
    assert [r.outcome for r in results] == ["completed", "completed", "cancelled", "cancelled", "completed",
                                            "error", "error", "error", "error"]
    assert results[0].output_tokens == 7 and results[2].latency_s < 1.0     # cancelled after 0.05 s
    assert "6 tokens instead of 7" in results[5].error and "HTTP 500" in results[6].error
    assert "SSE error event" in results[7].error and "[DONE]" in results[8].error
    assert finished == list(range(1, len(cases) + 1))


def _result(bench, i: int, outcome: str, latency: float, finished: float, tokens: int = 10) -> Any:
    return bench.RequestResult(i, outcome, latency, finished, tokens if outcome == "completed" else 0)


def test_summary_counts_percentiles_and_windows(bench) -> None:
    results = [_result(bench, i, "completed", 1.0 + i / 10, 2.0 + i) for i in range(18)]
    results += [_result(bench, 18, "cancelled", 0.5, 7.5), _result(bench, 19, "error", 0.1, 30.0)]
    results[19].error = "boom"
    s = bench.summarize(results, wall_s=20.0)
    assert (s["completed"], s["cancelled"], s["errors"], s["error_samples"]) == (18, 1, 1, ["boom"])
    assert s["p50_latency_s"] == pytest.approx(1.8) and s["p99_latency_s"] == pytest.approx(2.7)
    assert s["output_tok_s"] == pytest.approx(180 / 20.0) and s["request_throughput"] == pytest.approx(0.9)
    first, last = s["windows"]["first"], s["windows"]["last"]
    assert first["requests"] == 2 and first["p50_latency_s"] == pytest.approx(1.0)      # finished at 2 and 3
    assert first["output_tok_s"] == pytest.approx(20 / (3.0 - 1.0))                      # first start 1.0
    assert last["requests"] == 2 and last["completed"] == 1                              # 19.0 and the error
    assert bench.percentile([], 50) == 0.0 and bench.percentile([3.0], 99) == 3.0


def test_table_and_result_file_name(bench, capsys) -> None:
    results = [_result(bench, i, "completed", 1.0, 1.0 + i) for i in range(10)]
    result = {"num_requests": 10, "planned_cancellations": 1, "concurrency": 4, "model": "m", "machine": "AMD EPYC",
              "summary": bench.summarize(results, 10.0), "kv_blocks_leaked": 0,
              "rss_mib": {"start": 800.0, "middle": 900.0, "end": 1000.0, "peak": 1100.0},
              "idle_gauges_at_end": {g: 0.0 for g in bench.IDLE_GAUGES}}
    bench.print_table(result)
    printed = capsys.readouterr().out
    assert "800 / 900 / 1000" in printed and "1.25x" in printed and "first tenth (baseline)" in printed
    assert "10 / 0 / 0" in printed and "KV blocks leaked (must be 0)" in printed
    path = bench.result_path(Path("r"), "2026-12-07", "epyc", None)
    assert path == Path("r/soak_cpu_2026-12-07_epyc.json")
    assert bench.result_path(Path("r"), "2026-12-07", "epyc", "x").name == "soak_cpu_2026-12-07_epyc_x.json"
