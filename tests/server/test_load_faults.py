"""Load faults against a real server process: clients that disconnect or time out at
random points, abort storms, KV exhaustion forcing preemption, SIGTERM while streams are open.

One SmolLM2 server with a tiny KV cache (so load preempts) serves scenarios a-c; it is restarted
only if a scenario killed it. After each scenario the server must be alive and healthy, idle on
/metrics (nothing running, waiting or pending, every KV block free) and answer a greedy request
with the same tokens as before the storm. SIGTERM gets a server of its own. Loopback only; every
loop is bounded in count and time; random choices come from fixed seeds.
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Iterator

import httpx
import openai
import pytest

from tests.server_process import wait_healthy

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
MODEL = "smollm2-135m-instruct"
NUM_BLOCKS = 48                 # 768 tokens of KV: concurrent load must preempt
MAX_MODEL_LEN = 512
STARTUP_TIMEOUT_S = 300         # the first load converts the bundled GGUF once
STORM_TIMEOUT_S = 240           # no scenario's client side may take longer than this
IDLE_TIMEOUT_S = 30
_WORDS = ("river stone lantern harbor meadow copper violin orchard thunder candle glacier falcon "
          "compass velvet ember willow canyon mirror saddle beacon garden winter silver morning").split()
# the HTTP library under the openai SDK (httpx, or httpx2 in openai 3): it raises that library's
# timeouts, not APITimeoutError, when a read times out in the middle of a stream
SDK_HTTP = importlib.import_module(openai.DefaultAsyncHttpxClient.__mro__[1].__module__.split(".")[0])
REFERENCE = {"model": MODEL, "prompt": "Once upon a time, in a small village by the sea,", "max_tokens": 12,
             "temperature": 0, "ignore_eos": True, "logprobs": 1}


# ------------------------------------------------------------------------------ server process
@dataclass
class Server:
    """A running `python -m ascend_llm.server.api_server` on 127.0.0.1."""
    proc: subprocess.Popen
    base: str
    log: Path
    num_blocks: int
    model: str = MODEL

    @property
    def port(self) -> int:
        return int(self.base.rsplit(":", 1)[1])

    def log_tail(self, chars: int = 6000) -> str:
        lines = self.log.read_text(errors="replace").splitlines()
        return "\n".join(ln for ln in lines if "Loading weights" not in ln)[-chars:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(log_dir: Path, *extra: str, model: str = MODEL, num_blocks: int = NUM_BLOCKS,
                   max_model_len: int = MAX_MODEL_LEN) -> Iterator[Server]:
    """Start a server process, wait for /health, yield it; kill it on exit if it is still up."""
    port = _free_port()
    log = log_dir / f"server_{port}.log"
    cmd = [sys.executable, "-m", "ascend_llm.server.api_server", "--model", model, "--host", "127.0.0.1",
           "--port", str(port), "--device", "cpu", "--max-model-len", str(max_model_len),
           "--num-gpu-blocks-override", str(num_blocks), *extra]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    server = Server(proc, f"http://127.0.0.1:{port}", log, num_blocks, model)
    try:
        wait_healthy(server.base, proc, log, timeout=STARTUP_TIMEOUT_S)
        yield server
    finally:
        print(server.log_tail())        # shown by pytest when a test failed
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


class ServerKeeper:
    """The scenarios' shared server: reused while alive, restarted (with a fresh reference
    answer) only after a scenario killed it, so one crash does not fail every later scenario."""

    def __init__(self, log_dir: Path) -> None:
        self._log_dir = log_dir
        self._stack = contextlib.ExitStack()
        self.server: Server | None = None
        self.reference: list[str] = []

    def get(self) -> tuple[Server, list[str]]:
        if self.server is None or not healthy(self.server):
            if self.server is not None:
                self.server.proc.kill()
                self.server.proc.wait(30)
            self.server = self._stack.enter_context(running_server(self._log_dir))
            self.reference = greedy_tokens(self.server.base)
        return self.server, self.reference

    def close(self) -> None:
        self._stack.close()


def healthy(server: Server) -> bool:
    """The process runs and /health answers 200 (a failed engine may take a while to exit)."""
    if server.proc.poll() is not None:
        return False
    try:
        return httpx.get(f"{server.base}/health", timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def keeper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerKeeper]:
    keep = ServerKeeper(tmp_path_factory.mktemp("load_faults"))
    try:
        yield keep
    finally:
        keep.close()


# ------------------------------------------------------------------------------ metrics and checks
_SAMPLE = re.compile(r"^(ascend_llm:\w+)(?:\{(.*)\})? (\S+)$")


def scrape(base: str) -> dict[str, float]:
    """Every `ascend_llm:` sample on /metrics, keyed by name plus its labels other than model_name."""
    samples = {}
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, labels, value = match.groups()
        kept = [lab for lab in (labels or "").split(",") if lab and not lab.startswith("model_name=")]
        samples[name + (f"{{{','.join(kept)}}}" if kept else "")] = float(value)
    return samples


def idle_problems(metrics: dict[str, float], num_blocks: int) -> dict[str, float]:
    """The gauges that say the server still holds requests or KV blocks (empty when idle)."""
    expected = {"ascend_llm:num_requests_running": 0.0, "ascend_llm:num_requests_waiting": 0.0,
                "ascend_llm:num_requests_pending": 0.0, "ascend_llm:kv_cache_usage_perc": 0.0,
                "ascend_llm:num_free_kv_blocks": float(num_blocks)}
    return {name: metrics.get(name, float("nan")) for name, want in expected.items()
            if metrics.get(name) != want}


def wait_idle(server: Server, timeout: float = IDLE_TIMEOUT_S) -> dict[str, float]:
    """Poll /metrics until the server is idle; AssertionError naming the stuck gauges otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        assert server.proc.poll() is None, "server exited:\n" + server.log_tail()
        metrics = scrape(server.base)
        problems = idle_problems(metrics, server.num_blocks)
        if not problems:
            return metrics
        if time.monotonic() > deadline:
            raise AssertionError(f"not idle {timeout:.0f} s after the storm: {problems}")
        time.sleep(0.1)


def greedy_tokens(base: str, body: dict[str, Any] = REFERENCE) -> list[str]:
    """The tokens of a greedy completion (from its logprobs)."""
    resp = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    tokens = resp.json()["choices"][0]["logprobs"]["tokens"]
    assert len(tokens) == body["max_tokens"]
    return tokens


def assert_recovered(server: Server, reference: list[str]) -> dict[str, float]:
    """Alive, /health 200, idle with all KV blocks free, and the reference request unchanged."""
    assert healthy(server), "server dead or unhealthy after the storm:\n" + server.log_tail()
    metrics = wait_idle(server)
    assert greedy_tokens(server.base) == reference
    return metrics


def run_bounded(coro: Awaitable[Any], timeout: float = STORM_TIMEOUT_S) -> Any:
    """Run a scenario's client side on a fresh event loop, failing instead of hanging."""
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())


def make_prompt(rng: random.Random, num_words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(num_words))


# ------------------------------------------------------------------------------ a. disconnects
MAX_TOKENS_A = 16
FAULTS = ("vanish", "timeout_tiny", "timeout", "close_at_headers", "close_after_chunks")


@dataclass(frozen=True)
class ClientPlan:
    """What one client does: complete its stream, or fail in the way `fate` names."""
    prompt_index: int
    fate: str                       # "complete" or one of FAULTS
    timeout_s: float = 120.0
    chunks: int = 0                 # close_after_chunks: chunks read before closing


@dataclass
class ClientResult:
    status: str                     # completed | closed | timed_out | vanished | error
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int | None = None
    error: str = ""


def plan_clients(rng: random.Random, num_clients: int, num_prompts: int) -> list[ClientPlan]:
    """A random third of the clients misbehave: vanish before admission, time out (0.2-0.5 s),
    or close the stream at the headers (during prefill) or after k chunks (mid-stream)."""
    faulty = set(rng.sample(range(num_clients), num_clients // 3))
    plans = []
    for i in range(num_clients):
        fate = rng.choice(FAULTS) if i in faulty else "complete"
        timeout = {"timeout_tiny": 0.2, "timeout": rng.uniform(0.3, 0.5)}.get(fate, 120.0)
        plans.append(ClientPlan(i % num_prompts, fate, timeout, rng.randint(1, MAX_TOKENS_A - 2)))
    return plans


async def vanish(port: int, body: dict[str, Any], linger_s: float) -> ClientResult:
    """A client that sends its request and dies before any answer (a raw socket, closed)."""
    payload = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
    await writer.drain()
    await asyncio.sleep(linger_s)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return ClientResult("vanished")


async def consume(stream: Any, plan: ClientPlan) -> ClientResult:
    """Read an SDK completion stream to its end, or close it where the plan says."""
    result = ClientResult("completed")
    chunks = 0
    async for chunk in stream:
        if chunk.usage is not None:
            result.completion_tokens = chunk.usage.completion_tokens
        if chunk.choices:
            chunks += 1
            result.text += chunk.choices[0].text
            result.finish_reason = chunk.choices[0].finish_reason or result.finish_reason
        if plan.fate == "close_after_chunks" and chunks >= plan.chunks:
            await stream.close()
            return ClientResult("closed", result.text)
    return result


async def run_client(sdk: openai.AsyncOpenAI, port: int, prompt: str, plan: ClientPlan) -> ClientResult:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS_A, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    if plan.fate == "vanish":
        return await vanish(port, body, linger_s=0.01 * plan.chunks)
    try:
        stream = await sdk.with_options(timeout=plan.timeout_s).completions.create(
            model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS_A, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        if plan.fate == "close_at_headers":
            await stream.close()
            return ClientResult("closed")
        return await consume(stream, plan)
    except (openai.APITimeoutError, SDK_HTTP.TimeoutException):    # before the headers / mid-stream
        return ClientResult("timed_out")
    except openai.APIError as exc:
        return ClientResult("error", error=repr(exc))


async def disconnect_storm(server: Server, prompts: list[str], plans: list[ClientPlan]) -> list[ClientResult]:
    async with openai.AsyncOpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0) as sdk:
        return list(await asyncio.gather(*(run_client(sdk, server.port, prompts[p.prompt_index], p)
                                           for p in plans)))


async def completions_texts(base: str, prompts: list[str], max_tokens: int) -> list[str]:
    """Greedy texts of `prompts`, sent together (batched outputs equal solo ones on this engine)."""
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        async def one(prompt: str) -> str:
            resp = await client.post("/v1/completions", json={
                "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True})
            assert resp.status_code == 200, resp.text
            return resp.json()["choices"][0]["text"]
        return list(await asyncio.gather(*(one(p) for p in prompts)))


def test_a_random_disconnects_and_timeouts_of_64_streams(keeper: ServerKeeper) -> None:
    server, reference = keeper.get()
    rng = random.Random(2401)
    prompts = [make_prompt(rng, rng.randint(12, 40)) for _ in range(8)]
    expected = run_bounded(completions_texts(server.base, prompts, MAX_TOKENS_A))
    plans = plan_clients(rng, 64, len(prompts))
    results = run_bounded(disconnect_storm(server, prompts, plans))
    assert server.proc.poll() is None, "server died during the storm:\n" + server.log_tail()
    for plan, result in zip(plans, results):
        assert result.status != "error", (plan, result)
        if plan.fate == "complete" or result.status == "completed":
            assert result.status == "completed", (plan, result)
            assert result.finish_reason == "length" and result.completion_tokens == MAX_TOKENS_A, (plan, result)
            assert result.text == expected[plan.prompt_index], (plan, result)
    assert sum(r.status == "completed" for r in results) >= 64 - 64 // 3
    assert {"timed_out", "closed", "vanished"} <= {r.status for r in results}   # the faults did happen
    assert_recovered(server, reference)


def test_a_reported_case_24_sdk_clients_with_half_second_timeout(keeper: ServerKeeper) -> None:
    """Issue #24 as reported: 24 concurrent requests, openai SDK timeout=0.5, max_retries=0;
    they time out while queued behind long prefills, and the server must live on."""
    server, reference = keeper.get()
    rng = random.Random(2402)
    prompts = [make_prompt(rng, 150) for _ in range(24)]

    async def storm() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{server.base}/v1", api_key="unused", timeout=0.5,
                                      max_retries=0) as sdk:
            async def one(prompt: str) -> str:
                try:
                    await sdk.completions.create(model=MODEL, prompt=prompt, max_tokens=64, temperature=0)
                    return "completed"
                except openai.APITimeoutError:
                    return "timed_out"
            return list(await asyncio.gather(*(one(p) for p in prompts)))

    outcomes = run_bounded(storm())
    assert outcomes.count("timed_out") >= 20, outcomes      # 24 x 64 tokens cannot finish in 0.5 s
    assert_recovered(server, reference)


# ------------------------------------------------------------------------------ b. abort storms
async def cancel_after(task: asyncio.Task, delay_s: float) -> None:
    await asyncio.sleep(delay_s)
    task.cancel()


async def started_request(client: httpx.AsyncClient, body: dict[str, Any]) -> int:
    """Send a completion (streamed or not) and read it all; returns the HTTP status."""
    if not body["stream"]:
        return (await client.post("/v1/completions", json=body)).status_code
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        async for _ in resp.aiter_lines():
            pass
        return resp.status_code


async def abort_storm(base: str, rng: random.Random, rounds: int, per_round: int) -> list[int]:
    """`rounds` waves of `per_round` requests, each cancelled 0-300 ms after it starts (before,
    during or after admission and prefill); returns the statuses of requests that finished anyway."""
    finished: list[int] = []
    limits = httpx.Limits(max_connections=per_round + 4)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
        for _ in range(rounds):
            bodies = [{"model": MODEL, "prompt": make_prompt(rng, rng.randint(5, 200)), "max_tokens": 200,
                       "temperature": rng.choice([0, 0.8]), "ignore_eos": True, "stream": rng.random() < 0.5}
                      for _ in range(per_round)]
            tasks = [asyncio.create_task(started_request(client, b)) for b in bodies]
            await asyncio.gather(*(cancel_after(t, rng.uniform(0, 0.3)) for t in tasks))
            done, pending = await asyncio.wait(tasks, timeout=30)
            assert not pending, f"{len(pending)} cancelled requests did not end"
            finished += [t.result() for t in done if not t.cancelled() and t.exception() is None]
    return finished


def test_b_abort_storms(keeper: ServerKeeper) -> None:
    server, reference = keeper.get()
    before = scrape(server.base)
    finished = run_bounded(abort_storm(server.base, random.Random(2403), rounds=6, per_round=24))
    assert all(status == 200 for status in finished), finished
    after = assert_recovered(server, reference)
    # aborted requests stop generating: 144 x 200 tokens would take many minutes on this CPU
    generated = after["ascend_llm:generation_tokens_total"] - before["ascend_llm:generation_tokens_total"]
    assert generated < 144 * 200 // 4, generated


# ------------------------------------------------------------------------------ c. KV exhaustion
MAX_TOKENS_C = 40


async def mixed_completions(base: str, prompts: list[str]) -> list[str]:
    """Greedy texts of all prompts sent at once; odd ones streamed."""
    async with httpx.AsyncClient(base_url=base, timeout=180) as client:
        async def one(i: int, prompt: str) -> str:
            body = {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS_C, "temperature": 0,
                    "ignore_eos": True, "stream": i % 2 == 1}
            if not body["stream"]:
                resp = await client.post("/v1/completions", json=body)
                assert resp.status_code == 200, resp.text
                return resp.json()["choices"][0]["text"]
            return await streamed_text(client, body)
        return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


async def streamed_text(client: httpx.AsyncClient, body: dict[str, Any]) -> str:
    text, finish = "", None
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[len("data: "):])
                assert "error" not in event, event
                text += event["choices"][0]["text"]
                finish = event["choices"][0].get("finish_reason") or finish
    assert finish == "length"
    return text


def test_c_kv_exhaustion_preempts_and_every_request_is_still_right(keeper: ServerKeeper) -> None:
    server, reference = keeper.get()
    rng = random.Random(2404)
    prompts = [make_prompt(rng, rng.randint(40, 50)) for _ in range(10)]   # ~6 blocks each with output
    before = scrape(server.base)["ascend_llm:num_preemptions_total"]
    expected = run_bounded(mixed_completions(server.base, prompts[:5]))       # ~30 blocks: no preemption
    expected += run_bounded(mixed_completions(server.base, prompts[5:]))
    assert scrape(server.base)["ascend_llm:num_preemptions_total"] == before, "the reference runs preempted"
    got = run_bounded(mixed_completions(server.base, prompts))               # ~60 blocks > 48
    assert scrape(server.base)["ascend_llm:num_preemptions_total"] > before
    assert got == expected
    assert_recovered(server, reference)


# ------------------------------------------------------------------------------ d. SIGTERM
SHUTDOWN_TIMEOUT_S = 5.0


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) of a live process, None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), fields[0], int(fields[19])


def descendants(pid: int) -> dict[int, int]:
    """Every process below `pid`, as pid -> start time (so a reused pid is not mistaken for it)."""
    table = {int(p.name): _stat(int(p.name)) for p in Path("/proc").iterdir() if p.name.isdigit()}
    found: dict[int, int] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, stat in table.items():
            if stat is not None and stat[0] == parent and child not in found:
                found[child] = stat[2]
                frontier.append(child)
    return found


def left_behind(processes: dict[int, int]) -> list[int]:
    """The processes of `processes` still running (zombies awaiting reaping do not count)."""
    alive = []
    for pid, start in processes.items():
        stat = _stat(pid)
        if stat is not None and stat[2] == start and stat[1] != "Z":
            alive.append(pid)
    return alive


@dataclass
class StreamEnd:
    """How one SSE stream ended: finished | error_event | closed | hung."""
    how: str
    chunks: int = 0
    detail: str = ""
    events: list[Any] = field(default_factory=list)


class Settled:
    """Sets `all_settled` once each of `target` streams has received a chunk or ended without one."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.count = 0
        self.all_settled = asyncio.Event()

    def settle(self) -> None:
        self.count += 1
        if self.count >= self.target:
            self.all_settled.set()


async def watched_stream(client: httpx.AsyncClient, body: dict[str, Any], settled: Settled) -> StreamEnd:
    """Read one stream, settling at its first chunk (or its end); classify how it ended."""
    end = StreamEnd("closed")
    try:
        return await read_stream(client, body, end, settled)
    except httpx.ReadTimeout:
        return StreamEnd("hung", end.chunks, "no byte for 30 s")
    except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
        return StreamEnd("closed", end.chunks, repr(exc), end.events)
    finally:
        if end.chunks == 0:
            settled.settle()


async def read_stream(client: httpx.AsyncClient, body: dict[str, Any], end: StreamEnd, settled: Settled
                      ) -> StreamEnd:
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            return StreamEnd("refused", detail=f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            payload = line[len("data: "):]
            end.events.append(payload if payload == "[DONE]" else json.loads(payload))
            if payload != "[DONE]" and "choices" in end.events[-1]:
                end.chunks += 1
                if end.chunks == 1:
                    settled.settle()
    return classify(end)


def classify(end: StreamEnd) -> StreamEnd:
    """finished (finish_reason then [DONE]), error_event (an error event then [DONE]) or closed."""
    events = end.events
    errors = [e for e in events if isinstance(e, dict) and "error" in e]
    finishes = [e["choices"][0]["finish_reason"] for e in events
                if isinstance(e, dict) and e.get("choices") and e["choices"][0].get("finish_reason")]
    if errors:
        end.how, end.detail = "error_event", json.dumps(errors[-1])[:300]
        assert events[-1] == "[DONE]" and events[-2] is errors[-1], events[-3:]
    elif finishes and events[-1] == "[DONE]":
        end.how, end.detail = "finished", finishes[-1]
    return end


async def sigterm_with_open_streams(server: Server, num_streams: int, max_tokens: int
                                    ) -> tuple[list[StreamEnd], dict[int, int], int | None]:
    """Open the streams, SIGTERM once each has a chunk, then read them all to their end.
    Returns the ends, the server's descendants at SIGTERM, and the status a new request got."""
    rng = random.Random(2405)
    settled = Settled(num_streams)
    limits = httpx.Limits(max_connections=num_streams + 4)
    async with httpx.AsyncClient(base_url=server.base, timeout=httpx.Timeout(30, connect=5),
                                 limits=limits) as client:
        bodies = [{"model": server.model, "prompt": make_prompt(rng, rng.randint(3, 6)),
                   "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
                  for _ in range(num_streams)]
        tasks = [asyncio.create_task(watched_stream(client, b, settled)) for b in bodies]
        await asyncio.wait_for(settled.all_settled.wait(), 120)
        children = descendants(server.proc.pid)
        server.proc.send_signal(signal.SIGTERM)
        late = await late_request_status(server.base)
        ends = await asyncio.wait_for(asyncio.gather(*tasks), SHUTDOWN_TIMEOUT_S + 90)
    return list(ends), children, late


async def late_request_status(base: str) -> int | None:
    """Status of a request sent just after SIGTERM (None: the connection was refused / closed)."""
    await asyncio.sleep(0.3)
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            resp = await client.post(f"{base}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            return resp.status_code
    except httpx.HTTPError:
        return None


@pytest.mark.parametrize("variant", ["smollm2", "tiny-tp2"])
def test_d_sigterm_with_16_open_streams(variant: str, request: pytest.FixtureRequest,
                                        tmp_path: Path) -> None:
    """Every stream finishes or ends cleanly (error event + [DONE], or a closed connection), the
    process exits 0 in time, and no child (tensor-parallel worker, resource tracker) survives."""
    if variant == "smollm2":
        config = dict(model=MODEL, num_blocks=128, max_model_len=MAX_MODEL_LEN, extra=(), max_tokens=96)
    else:
        tiny = request.getfixturevalue("tiny_llama_dir")
        config = dict(model=str(tiny), num_blocks=128, max_model_len=256, extra=("--tp", "2"), max_tokens=120)
    with running_server(tmp_path, "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S), *config["extra"],
                        model=config["model"], num_blocks=config["num_blocks"],
                        max_model_len=config["max_model_len"]) as server:
        ends, children, late = run_bounded(sigterm_with_open_streams(server, 16, config["max_tokens"]))
        code = server.proc.wait(timeout=SHUTDOWN_TIMEOUT_S + 60)
        tail = server.log_tail()
    summary = [(e.how, e.chunks, e.detail[:100]) for e in ends]
    assert code == 0, f"exit code {code}; streams {summary}:\n{tail}"
    assert all(end.chunks >= 1 for end in ends), summary
    assert [e.how for e in ends if e.how not in ("finished", "error_event", "closed")] == [], summary
    for end in ends:
        if end.how == "finished":
            assert end.detail == "length" and end.chunks >= 1
    assert late != 200, "a request sent after SIGTERM was served"
    if variant == "tiny-tp2":
        assert len(children) >= 2, children      # the rank-1 worker and the resource tracker
    deadline = time.monotonic() + 10
    while left_behind(children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left_behind(children) == [], {pid: _stat(pid) for pid in left_behind(children)}
