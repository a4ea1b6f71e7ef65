"""Soak benchmark: thousands of mixed requests, some cancelled, against one `ascend-llm serve` process.

Starts the server on 127.0.0.1 and sends `--num-requests` completions of mixed prompt and output
lengths (real text, `ignore_eos` so each must return exactly its max_tokens; half streamed, half
greedy) with at most `--concurrency` in flight. `--cancel-fraction` of them are cancelled by the
client at a random moment (before admission, in prefill or mid-decode); all choices come from
`--seed`. Reports the server's RSS at start / middle / end, the KV blocks leaked (free blocks when
idle after the run vs before it: must be 0), errors other than the cancellations (must be 0),
latency p50 / p99 and throughput of the completed requests, and wall time.

The baseline, measured in the same run, is the first tenth of the requests to finish: the last
tenth's latency and throughput and the end RSS are shown as ratios to it, so a leak or a slowdown
over the run stands out. Writes JSON under benchmarks/results/; extra arguments go to the server.

    python benchmarks/bench_soak.py                          # 2,000 requests (10-20 min on 2 cores)
    python benchmarks/bench_soak.py --num-requests 100       # a quick check
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx

from server_probe import proc_status, wait_healthy     # benchmarks/ is on sys.path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "eval_tempest.txt"
RESULTS = Path(__file__).resolve().parent / "results"
# (range, weight): ~60 prompt words (~75 tokens) and ~27 output tokens per request on average
PROMPT_WORDS = (((8, 32), 0.55), ((32, 128), 0.35), ((128, 256), 0.1))
OUTPUT_TOKENS = (((4, 16), 0.5), ((16, 48), 0.4), ((48, 128), 0.1))
MAX_CANCEL_DELAY_S = 3.0
WINDOW_FRACTION = 0.1


@dataclass(frozen=True)
class RequestSpec:
    """One request of the workload; `cancel_after_s` set: the client cancels it after that long."""
    index: int
    prompt_words: int
    offset: int
    max_tokens: int
    stream: bool
    temperature: float
    cancel_after_s: float | None = None


@dataclass
class RequestResult:
    """What happened to one request: completed | cancelled | error (times in seconds from the start)."""
    index: int
    outcome: str
    latency_s: float
    finished_at_s: float
    output_tokens: int = 0
    error: str = ""


@dataclass
class RssTrace:
    """Server RSS (MiB), sampled whenever another `every` requests have finished."""
    pid: int
    every: int
    samples: list[tuple[int, float]] = field(default_factory=list)     # (requests finished, MiB)

    def sample(self, finished: int) -> float:
        mib = proc_status(self.pid)["VmRSS"] / 1024
        self.samples.append((finished, mib))
        return mib

    def on_finished(self, finished: int) -> None:
        if finished % self.every == 0:
            self.sample(finished)

    def nearest(self, finished: int) -> float:
        """The sample taken closest to `finished` requests."""
        return min(self.samples, key=lambda s: abs(s[0] - finished))[1]


# ------------------------------------------------------------------------------------- workload
def _draw(rng: random.Random, buckets: tuple[tuple[tuple[int, int], float], ...]) -> int:
    (lo, hi), = rng.choices([b for b, _ in buckets], weights=[w for _, w in buckets])
    return rng.randint(lo, hi)


def make_workload(num_requests: int, cancel_fraction: float, seed: int, num_words: int) -> list[RequestSpec]:
    """The seeded request mix; exactly round(cancel_fraction * n) requests are to be cancelled."""
    rng = random.Random(seed)
    cancelled = set(rng.sample(range(num_requests), round(cancel_fraction * num_requests)))
    specs = []
    for i in range(num_requests):
        words = _draw(rng, PROMPT_WORDS)
        specs.append(RequestSpec(
            index=i, prompt_words=words, offset=rng.randrange(max(1, num_words - words)),
            max_tokens=_draw(rng, OUTPUT_TOKENS), stream=rng.random() < 0.5,
            temperature=rng.choice([0.0, 0.7]),
            cancel_after_s=rng.uniform(0.0, MAX_CANCEL_DELAY_S) if i in cancelled else None))
    return specs


def load_words() -> list[str]:
    text = DATA.read_text() if DATA.exists() else "The quick brown fox jumps over the lazy dog. " * 3000
    return text.split()


def request_body(spec: RequestSpec, words: list[str], model: str) -> dict[str, Any]:
    body = {"model": model, "prompt": " ".join(words[spec.offset: spec.offset + spec.prompt_words]),
            "max_tokens": spec.max_tokens, "temperature": spec.temperature, "ignore_eos": True,
            "seed": spec.index, "stream": spec.stream}
    if spec.stream:
        body["stream_options"] = {"include_usage": True}
    return body


# ------------------------------------------------------------------------------------- client
async def completion_tokens(client: httpx.AsyncClient, body: dict[str, Any]) -> int:
    """Send one completion; its completion_tokens, or RuntimeError naming what was wrong."""
    if not body["stream"]:
        resp = await client.post("/v1/completions", json=body)
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:200]}")
        return resp.json()["usage"]["completion_tokens"]
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
        return await _stream_tokens(resp)


async def _stream_tokens(resp: httpx.Response) -> int:
    tokens, done = None, False
    async for line in resp.aiter_lines():
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            continue
        event = json.loads(line[len("data: "):])
        if "error" in event:
            raise RuntimeError(f"SSE error event: {json.dumps(event)[:200]}")
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
    if not done or tokens is None:
        raise RuntimeError(f"stream ended without {'[DONE]' if not done else 'usage'}")
    return tokens


async def run_request(client: httpx.AsyncClient, spec: RequestSpec, body: dict[str, Any],
                      t0: float) -> RequestResult:
    """Send `body`, cancelling it after spec.cancel_after_s if that is set and it is still running."""
    start = time.perf_counter()
    task = asyncio.ensure_future(completion_tokens(client, body))
    done, _ = await asyncio.wait({task}, timeout=spec.cancel_after_s)
    now = time.perf_counter()
    if not done:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return RequestResult(spec.index, "cancelled", now - start, now - t0)
    try:
        tokens = task.result()
    except Exception as exc:  # every failure is counted, none stops the soak
        return RequestResult(spec.index, "error", now - start, now - t0, error=repr(exc)[:300])
    if tokens != spec.max_tokens:
        return RequestResult(spec.index, "error", now - start, now - t0, tokens,
                             f"{tokens} tokens instead of {spec.max_tokens} (ignore_eos)")
    return RequestResult(spec.index, "completed", now - start, now - t0, tokens)


async def run_load(client: httpx.AsyncClient, specs: list[RequestSpec], words: list[str], model: str,
                   concurrency: int, on_finished: Callable[[int], None]) -> list[RequestResult]:
    """All requests, at most `concurrency` in flight; on_finished(count) after each one ends."""
    gate = asyncio.Semaphore(concurrency)
    finished = [0]
    t0 = time.perf_counter()

    async def limited(spec: RequestSpec) -> RequestResult:
        async with gate:
            result = await run_request(client, spec, request_body(spec, words, model), t0)
        finished[0] += 1
        on_finished(finished[0])
        return result

    return list(await asyncio.gather(*(limited(s) for s in specs)))


# ------------------------------------------------------------------------------------- server
_SAMPLE = re.compile(r'^ascend_llm:(\w+)\{model_name="[^"]*"\} (\S+)$')
IDLE_GAUGES = ("num_requests_running", "num_requests_waiting", "num_requests_pending", "kv_cache_usage_perc")


def engine_gauges(base: str) -> dict[str, float]:
    """The server's /metrics samples that carry only the model_name label, by short name."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return {m.group(1): float(m.group(2)) for m in map(_SAMPLE.match, text.splitlines()) if m}


def wait_idle(base: str, timeout: float) -> dict[str, float]:
    """Gauges once nothing runs, waits or is pending (or as they are after `timeout`)."""
    deadline = time.monotonic() + timeout
    gauges = engine_gauges(base)
    while any(gauges.get(name, 1.0) != 0 for name in IDLE_GAUGES) and time.monotonic() < deadline:
        time.sleep(0.5)
        gauges = engine_gauges(base)
    return gauges


@contextlib.contextmanager
def server_process(model: str, port: int, server_args: list[str], log: Path) -> Iterator[subprocess.Popen]:
    """`python -m ascend_llm.server.api_server` on 127.0.0.1:port; SIGTERM (then kill) on exit."""
    cmd = [sys.executable, "-m", "ascend_llm.server.api_server", "--model", model, "--host", "127.0.0.1",
           "--port", str(port), *server_args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc, timeout=600)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


# ------------------------------------------------------------------------------------- summary
def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (0.0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(pct / 100 * (len(ordered) - 1)))))]


def window_stats(results: list[RequestResult], start: int, end: int) -> dict[str, float]:
    """Latency and throughput of the completed requests among the start..end-th to finish."""
    ordered = sorted(results, key=lambda r: r.finished_at_s)[start:end]
    completed = [r for r in ordered if r.outcome == "completed"]
    begin = ordered[0].finished_at_s - ordered[0].latency_s if ordered else 0.0
    span = max(1e-9, (ordered[-1].finished_at_s if ordered else 0.0) - begin)
    return {"requests": len(ordered), "completed": len(completed),
            "p50_latency_s": percentile([r.latency_s for r in completed], 50),
            "output_tok_s": sum(r.output_tokens for r in completed) / span}


def summarize(results: list[RequestResult], wall_s: float) -> dict[str, Any]:
    """Counts, latency percentiles, throughput and first / middle / last windows of the run."""
    completed = [r for r in results if r.outcome == "completed"]
    errors = [r for r in results if r.outcome == "error"]
    n = len(results)
    width = max(1, round(WINDOW_FRACTION * n))
    mid = max(0, (n - width) // 2)
    latencies = [r.latency_s for r in completed]
    return {"completed": len(completed), "cancelled": sum(r.outcome == "cancelled" for r in results),
            "errors": len(errors), "error_samples": sorted({r.error for r in errors})[:5],
            "wall_s": wall_s, "request_throughput": len(completed) / wall_s,
            "output_tok_s": sum(r.output_tokens for r in completed) / wall_s,
            "p50_latency_s": percentile(latencies, 50), "p99_latency_s": percentile(latencies, 99),
            "windows": {"first": window_stats(results, 0, width), "middle": window_stats(results, mid, mid + width),
                        "last": window_stats(results, n - width, n)}}


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base else "-"


def print_table(result: dict[str, Any]) -> None:
    s, rss = result["summary"], result["rss_mib"]
    print(f"\nsoak: {result['num_requests']} requests ({result['planned_cancellations']} to be cancelled), "
          f"concurrency {result['concurrency']}, {result['model']} on {result['machine']}")
    rows = [("wall time (s)", f"{s['wall_s']:.1f}"),
            ("completed / cancelled / errors", f"{s['completed']} / {s['cancelled']} / {s['errors']}"),
            ("completed requests/s", f"{s['request_throughput']:.2f}"),
            ("output tokens/s", f"{s['output_tok_s']:.1f}"),
            ("latency p50 / p99 (s)", f"{s['p50_latency_s']:.2f} / {s['p99_latency_s']:.2f}"),
            ("server RSS start / middle / end (MiB)", f"{rss['start']:.0f} / {rss['middle']:.0f} / {rss['end']:.0f}"),
            ("server RSS end vs start", _ratio(rss["end"], rss["start"])),
            ("server peak RSS (MiB)", f"{rss['peak']:.0f}"),
            ("KV blocks leaked (must be 0)", str(result["kv_blocks_leaked"])),
            ("running / waiting / pending at end", " / ".join(f"{result['idle_gauges_at_end'].get(g, -1):.0f}"
                                                              for g in IDLE_GAUGES[:3]))]
    for name, value in rows:
        print(f"{name:<40} {value:>22}")
    first = s["windows"]["first"]
    print(f"\n{'window (by finish order)':<26} {'done':>5} {'p50 lat (s)':>12} {'out tok/s':>10} {'vs first':>9}")
    for name, w in s["windows"].items():
        label = f"{name} tenth" + (" (baseline)" if name == "first" else "")
        print(f"{label:<26} {w['completed']:>5} {w['p50_latency_s']:>12.2f} {w['output_tok_s']:>10.1f} "
              f"{_ratio(w['p50_latency_s'], first['p50_latency_s']):>9}")


def result_path(out_dir: Path, date: str, machine_slug: str, tag: str | None) -> Path:
    return out_dir / f"soak_cpu_{date}_{machine_slug}{'_' + tag if tag else ''}.json"


def code_version() -> str:
    """The git commit of the benchmarked code (+dirty when the tree has changes)."""
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


# ------------------------------------------------------------------------------------- main
def parse_args() -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--port", type=int, default=8079)
    parser.add_argument("--num-requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=24)
    parser.add_argument("--cancel-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--tag", default=None, help="suffix of the result file name")
    parser.add_argument("--note", default="", help="free text stored in the JSON")
    parser.add_argument("--out", default=str(RESULTS))
    return parser.parse_known_args()            # anything else goes to the server


def soak(args: argparse.Namespace, server_args: list[str], log: Path) -> dict[str, Any]:
    """Start the server, run the workload, measure; the result dict (without machine fields)."""
    words = load_words()
    specs = make_workload(args.num_requests, args.cancel_fraction, args.seed, len(words))
    base = f"http://127.0.0.1:{args.port}"
    server_args = ["--max-model-len", str(args.max_model_len), *server_args]
    with server_process(args.model, args.port, server_args, log) as proc:
        free_before = wait_idle(base, 60)["num_free_kv_blocks"]
        trace = RssTrace(proc.pid, every=max(1, args.num_requests // 10))
        start_rss = trace.sample(0)
        limits = httpx.Limits(max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency + 4)
        t0 = time.perf_counter()
        results = asyncio.run(_load(base, specs, words, args.model, args.concurrency, limits,
                                    trace.on_finished))
        wall = time.perf_counter() - t0
        gauges = wait_idle(base, 120)
        end_rss = trace.sample(args.num_requests)
        healthy = httpx.get(f"{base}/health", timeout=10).status_code == 200
        peak = proc_status(proc.pid)["VmHWM"] / 1024
    middle = trace.nearest(args.num_requests // 2)
    return {"model": args.model, "num_requests": args.num_requests, "concurrency": args.concurrency,
            "cancel_fraction": args.cancel_fraction, "seed": args.seed,
            "planned_cancellations": sum(s.cancel_after_s is not None for s in specs),
            "server_args": server_args, "summary": summarize(results, wall),
            "rss_mib": {"start": start_rss, "middle": middle, "end": end_rss, "peak": peak},
            "rss_trace_mib": trace.samples, "kv_blocks_total": free_before,
            "kv_blocks_leaked": int(free_before - gauges["num_free_kv_blocks"]),
            "idle_gauges_at_end": {g: gauges.get(g, -1.0) for g in IDLE_GAUGES},
            "healthy_at_end": healthy}


async def _load(base: str, specs: list[RequestSpec], words: list[str], model: str, concurrency: int,
                limits: httpx.Limits, on_finished: Callable[[int], None]) -> list[RequestResult]:
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        return await run_load(client, specs, words, model, concurrency, on_finished)


def main() -> None:
    args, server_args = parse_args()
    from bench_offline import cpu_model_name, machine_slug     # benchmarks/ is on sys.path
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        try:
            result = soak(args, server_args, log)
        except Exception:
            print(log.read_text(errors="replace")[-4000:] if log.exists() else "(no server log)")
            raise
    machine = cpu_model_name()
    result = {"date": dt.date.today().isoformat(), "machine": machine, "cpus": os.cpu_count(),
              "code": code_version(), "note": args.note, **result}
    print_table(result)
    out = result_path(Path(args.out), result["date"], machine_slug(machine), args.tag)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
