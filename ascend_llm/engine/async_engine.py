"""AsyncLLMEngine: one thread drives `LLMEngine.step()`, outputs fan out to per-request asyncio queues.

The `LLMEngine` is not thread-safe, so only the engine thread touches it. Callers on
an asyncio event loop send commands (add / abort) through a thread-safe queue and
receive `RequestOutput`s on an `asyncio.Queue` that the engine thread fills with
`loop.call_soon_threadsafe`. The event loop therefore never blocks on a forward pass.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Protocol

from ascend_llm.engine.heap_trim import HeapTrimmer
from ascend_llm.outputs import RequestOutput
from ascend_llm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_IDLE_POLL_S = 0.2
_MAX_CONSECUTIVE_STEP_FAILURES = 3


class EngineState(str, enum.Enum):
    """Life cycle of the engine thread."""
    CREATED = "created"
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


class EngineUnavailableError(RuntimeError):
    """The engine is loading, draining, stopped or failed: the request was not admitted."""


class EngineOverloadedError(RuntimeError):
    """Too many requests are already waiting: the request was not admitted."""


class EngineStepError(RuntimeError):
    """A forward step failed while this request was in flight."""


class RequestAbortedError(RuntimeError):
    """The request was aborted before the engine admitted it."""


class StatsListener(Protocol):
    """Receives per-step outputs on the engine thread (e.g. Prometheus metrics)."""

    def record_step(self, outputs: list[RequestOutput], now: float) -> None: ...

    def record_abort(self, request_id: str) -> None: ...


@dataclass
class _Sink:
    """Where a request's outputs go: an asyncio queue owned by `loop`."""
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


@dataclass
class _Command:
    kind: str                      # "add" | "abort"
    request_id: str
    args: tuple = ()
    future: concurrent.futures.Future | None = None


@dataclass
class _Health:
    last_progress: float = field(default_factory=time.monotonic)
    consecutive_failures: int = 0
    error: str | None = None


class AsyncLLMEngine:
    """Asyncio front end of an `LLMEngine`, driven by a dedicated thread.

    Build it around a ready engine (`AsyncLLMEngine(engine)`) or let the thread load
    one (`AsyncLLMEngine.from_engine_args(args)`); `state` is LOADING until then.
    `max_pending_requests` bounds admitted-but-unfinished requests (None: unbounded);
    beyond it `add_request` raises `EngineOverloadedError` at once.
    """

    def __init__(self, engine: Any | None = None, *, engine_factory: Callable[[], Any] | None = None,
                 max_pending_requests: int | None = None, stall_timeout_s: float = 60.0) -> None:
        if (engine is None) == (engine_factory is None):
            raise ValueError("AsyncLLMEngine: give exactly one of engine / engine_factory")
        self._engine = engine
        self._factory = engine_factory
        self.max_pending_requests = max_pending_requests
        self.stall_timeout_s = stall_timeout_s
        self._state = EngineState.READY if engine is not None else EngineState.CREATED
        self._commands: queue.Queue[_Command] = queue.Queue()
        self._sinks: dict[str, _Sink] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._health = _Health()
        self._snapshot: dict[str, Any] = {}
        self._listeners: list[StatsListener] = []
        self.on_fatal: Callable[[str], None] | None = None
        self.health_checks: list[Callable[[], str | None]] = []    # more not-ready reasons (accuracy guard)
        self.heap_trimmer = HeapTrimmer()        # freed heap back to the OS between steps
        if engine is not None:
            self._ready.set()
            self._snapshot = self._read_stats()

    @classmethod
    def from_engine_args(cls, engine_args: Any, on_load: Callable[[Any], Any] | None = None,
                         **kwargs: Any) -> "AsyncLLMEngine":
        """Load the engine on the engine thread (call `start()`); /health reports 503 meanwhile.
        `on_load(engine) -> engine` runs there too, before any request (e.g. the accuracy guard)."""
        from ascend_llm.engine.llm_engine import LLMEngine
        hook = on_load or (lambda engine: engine)
        return cls(engine_factory=lambda: hook(LLMEngine(engine_args)), **kwargs)

    # ---------------------------------------------------------------- status
    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def engine(self) -> Any:
        """The wrapped `LLMEngine`; raises EngineUnavailableError until it has loaded."""
        if self._engine is None:
            raise EngineUnavailableError(f"the model is {self._state.value}, not ready yet")
        return self._engine

    @property
    def is_ready(self) -> bool:
        return self._state is EngineState.READY

    @property
    def num_pending_requests(self) -> int:
        """Admitted requests that have not finished (waiting + running, server side)."""
        return len(self._sinks)

    def add_stats_listener(self, listener: StatsListener) -> None:
        self._listeners.append(listener)

    def stats(self) -> dict[str, Any]:
        """Latest engine counters (published by the engine thread after each step)."""
        return dict(self._snapshot, num_pending=len(self._sinks), state=self._state.value)

    def health(self) -> tuple[bool, str]:
        """(healthy, reason). Unhealthy while loading, draining, after failure, or when stalled."""
        if self._state is not EngineState.READY:
            return False, f"engine {self._state.value}" + (f": {self._health.error}" if self._health.error else "")
        if self._thread is not None and not self._thread.is_alive():
            return False, "engine thread is not running"
        problem = _engine_problem(self._engine)      # e.g. a tensor-parallel worker died
        problem = problem or next((p for p in (check() for check in self.health_checks) if p), None)
        if problem is not None:
            return False, problem
        idle_for = time.monotonic() - self._health.last_progress
        if self._thread is not None and idle_for > self.stall_timeout_s:
            return False, f"engine made no progress for {idle_for:.0f} s"
        return True, "ok"

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout) and self._state is EngineState.READY

    # ------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the engine thread (idempotent)."""
        with self._lock:
            if self._thread is not None:
                return
            if self._state is EngineState.CREATED:
                self._state = EngineState.LOADING
            self._health.last_progress = time.monotonic()
            self._thread = threading.Thread(target=self._run, name="ascend-llm-engine", daemon=True)
            self._thread.start()

    def begin_drain(self) -> None:
        """Stop admitting requests (503); in-flight ones keep running."""
        if self._state in (EngineState.READY, EngineState.LOADING, EngineState.CREATED):
            logger.info("engine draining: %d request(s) in flight", len(self._sinks))
            self._state = EngineState.DRAINING

    def shutdown(self, timeout: float = 10.0) -> None:
        """Drain for up to `timeout` s, abort what is left, stop the thread."""
        self.begin_drain()
        deadline = time.monotonic() + timeout
        while self._sinks and self._thread is not None and self._thread.is_alive() \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, deadline - time.monotonic()))
        self._fail_all(EngineUnavailableError("the server is shutting down"))
        if self._state is not EngineState.FAILED:
            self._state = EngineState.STOPPED
        stop_workers = getattr(self._engine, "shutdown", None)
        if stop_workers is not None and (self._thread is None or not self._thread.is_alive()):
            stop_workers()                            # tensor-parallel worker processes

    # -------------------------------------------------------------- requests
    async def add_request(self, request_id: str, prompt: str | None, params: SamplingParams,
                          prompt_token_ids: list[int] | None = None,
                          out_queue: asyncio.Queue | None = None) -> asyncio.Queue:
        """Admit a request; its outputs (or an exception) arrive on the returned queue.

        Several requests may share `out_queue`. Raises ValueError (engine validation),
        EngineOverloadedError or EngineUnavailableError; nothing is queued then.
        """
        self.start()
        await self._compile_grammar(params)
        loop = asyncio.get_running_loop()
        sink = _Sink(loop, out_queue if out_queue is not None else asyncio.Queue())
        self._register(request_id, sink)
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(_Command("add", request_id, (prompt, params, prompt_token_ids), future))
        try:
            await asyncio.wrap_future(future)
        except BaseException:
            self.abort(request_id)
            raise
        return sink.queue

    async def _compile_grammar(self, params: SamplingParams) -> None:
        """Compile a structured-output grammar on a worker thread (cached by the engine), so the
        engine loop only finds it; ValueError if it does not compile."""
        compile_grammar = getattr(self._engine, "compile_grammar", None)
        if params.structured_outputs is not None and compile_grammar is not None:
            await asyncio.to_thread(compile_grammar, params.structured_outputs)

    async def generate(self, request_id: str, prompt: str | None, params: SamplingParams,
                       prompt_token_ids: list[int] | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs until it finishes; aborts it if the consumer stops early."""
        out_queue = await self.add_request(request_id, prompt, params, prompt_token_ids)
        finished = False
        try:
            while not finished:
                item = await out_queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request (thread-safe; unknown or finished ids are ignored)."""
        with self._lock:
            known = self._sinks.pop(request_id, None) is not None
        if known:
            self._commands.put(_Command("abort", request_id))

    def _register(self, request_id: str, sink: _Sink) -> None:
        with self._lock:
            if self._state is EngineState.LOADING:
                raise EngineUnavailableError("the model is still loading; retry shortly")
            if self._state is not EngineState.READY:
                raise EngineUnavailableError(f"the engine is {self._state.value}; not accepting requests")
            if request_id in self._sinks:
                raise ValueError(f"request_id: {request_id!r} is already in use")
            limit = self.max_pending_requests
            if limit is not None and len(self._sinks) >= limit:
                raise EngineOverloadedError(
                    f"the server is overloaded: {len(self._sinks)} requests pending (limit {limit}); retry later")
            self._sinks[request_id] = sink

    # ---------------------------------------------------------- engine thread
    def _run(self) -> None:
        if self._engine is None and not self._load():
            return
        try:
            while not self._stop.is_set():
                self._drain_commands(block=not self._engine.has_unfinished_requests())
                if self._engine.has_unfinished_requests():
                    self._step_once()
                    self.heap_trimmer.after_step()
                else:
                    self.heap_trimmer.on_idle()
                self._health.last_progress = time.monotonic()
        except Exception as exc:  # a bug in the loop itself: fail loudly, never hang clients
            logger.exception("engine loop crashed")
            self._mark_failed(f"engine loop crashed: {exc}")

    def _load(self) -> bool:
        try:
            self._engine = self._factory()
        except Exception as exc:
            logger.exception("failed to load the model")
            self._mark_failed(f"model load failed: {exc}")
            self._ready.set()
            return False
        with self._lock:
            if self._state is EngineState.LOADING:
                self._state = EngineState.READY
        self._snapshot = self._read_stats()
        self._ready.set()
        return True

    def _mark_failed(self, reason: str) -> None:
        self._state = EngineState.FAILED
        self._health.error = reason
        self._fail_all(EngineUnavailableError(reason))
        if self.on_fatal is not None:
            self.on_fatal(reason)

    def _drain_commands(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=_IDLE_POLL_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(cmd)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
        self._snapshot = self._read_stats()

    def _apply(self, cmd: _Command) -> None:
        """Carry out one command; a failure costs only that command's request."""
        try:
            if cmd.kind == "abort":
                self._engine.abort_request(cmd.request_id)
                self._notify("record_abort", cmd.request_id)
            else:
                self._admit(cmd)
        except Exception:
            logger.exception("engine command %s for %s failed", cmd.kind, cmd.request_id)
            self._forget(cmd.request_id)

    def _admit(self, cmd: _Command) -> None:
        """Add a request unless its caller gave up (cancelled the admission future) or aborted
        it while it was queued; the caller's future is resolved only if still wanted."""
        if not cmd.future.set_running_or_notify_cancel():     # the client timed out while queued
            self._forget(cmd.request_id)
            return
        if cmd.request_id not in self._sinks:                  # aborted before it was added
            cmd.future.set_exception(RequestAbortedError(f"{cmd.request_id} was aborted"))
            return
        try:
            prompt, params, prompt_token_ids = cmd.args
            self._engine.add_request(cmd.request_id, prompt, params, prompt_token_ids)
        except Exception as exc:
            self._forget(cmd.request_id)
            cmd.future.set_exception(exc)
            return
        cmd.future.set_result(None)

    def _forget(self, request_id: str) -> None:
        """Drop a request's sink and anything the engine holds for it."""
        with self._lock:
            self._sinks.pop(request_id, None)
        self._engine.abort_request(request_id)

    def _step_once(self) -> None:
        try:
            outputs = self._engine.step()
        except Exception as exc:
            self._on_step_failure(exc)
            return
        self._health.consecutive_failures = 0
        self._snapshot = self._read_stats()
        self._notify("record_step", outputs, time.time())
        self._deliver(outputs)

    def _on_step_failure(self, exc: Exception) -> None:
        logger.exception("engine step failed; failing the %d in-flight request(s)", len(self._sinks))
        self._health.consecutive_failures += 1
        with self._lock:
            failed = list(self._sinks.items())
            self._sinks.clear()
        for request_id, sink in failed:
            self._engine.abort_request(request_id)
            _post(sink, EngineStepError(f"engine step failed: {exc}"))
        if getattr(exc, "fatal", False):              # a dead tensor-parallel worker: no retry
            self._mark_failed(str(exc))
            self._stop.set()
        elif self._health.consecutive_failures >= _MAX_CONSECUTIVE_STEP_FAILURES:
            self._mark_failed(f"{self._health.consecutive_failures} consecutive step failures: {exc}")
            self._stop.set()

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        with self._lock:
            for out in outputs:
                sink = self._sinks.pop(out.request_id, None) if out.finished else self._sinks.get(out.request_id)
                if sink is not None:
                    batches.setdefault(sink.loop, []).append((sink.queue, out))
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:           # the caller's loop is closed: nobody is listening
                for _, out in items:
                    if not out.finished:
                        self.abort(out.request_id)

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            sinks = list(self._sinks.values())
            self._sinks.clear()
        for sink in sinks:
            _post(sink, exc)

    def _notify(self, method: str, *args: Any) -> None:
        for listener in self._listeners:
            try:
                getattr(listener, method)(*args)
            except Exception:  # metrics must never take the engine down
                logger.exception("stats listener %r failed in %s", listener, method)

    def _read_stats(self) -> dict[str, Any]:
        return dict(self._engine.stats())


def _engine_problem(engine: Any) -> str | None:
    """The engine's own health report (`check_health`), if it has one."""
    check = getattr(engine, "check_health", None)
    return check() if callable(check) else None


def _put_all(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for q, item in items:
        q.put_nowait(item)


def _post(sink: _Sink, item: Any) -> None:
    try:
        sink.loop.call_soon_threadsafe(sink.queue.put_nowait, item)
    except RuntimeError:
        pass
