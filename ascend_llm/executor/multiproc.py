"""Driver side of tensor parallelism: start the worker ranks, broadcast every step, watch them.

`MultiprocExecutor` (`--distributed-executor-backend mp`, the default) starts tp_size - 1
worker processes on this node (fork or spawn: `start_method`); the engine process is rank 0 and runs its own shard. With
torchrun-style env (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) every rank is launched from
outside: rank 0 drives (`ExternalLaunchExecutor`), the others run the worker loop.

A worker that dies is reported as `WorkerDiedError` naming its rank and exit code (at once during
start-up, before every step, and when a collective fails) instead of a hang; the process-group timeout bounds
the wait for a rank that hangs without dying.
"""
from __future__ import annotations

import logging
import time
import weakref
from typing import Any

from ascend_llm.distributed.errors import TensorParallelError, WorkerDiedError
from ascend_llm.distributed.parallel_state import (ParallelContext, destroy_parallel_context, free_port,
                                                   init_parallel_context)
from ascend_llm.distributed.start_method import ProcessFacts, choose_start_method
from ascend_llm.distributed.worker import CaptureDecodeGraphs, WorkerSpec, broadcast_step
from ascend_llm.distributed.worker_processes import (await_reports, first_failure, start_workers,
                                                     stop_processes)

logger = logging.getLogger(__name__)

_DEATH_POLL_S = 3.0      # after a failed collective: how long to wait for a peer's exit status
_STARTUP_POLL_S = 15.0   # after a failed start-up: how long to wait for a worker's own report


class DriverExecutor:
    """Rank 0: owns the driver's ModelRunner, broadcasts each SchedulerOutput to the workers."""

    def __init__(self, parallel: ParallelContext, runner: Any) -> None:
        self.parallel = parallel
        self.driver_runner = runner
        self.failure: str | None = None

    def check_health(self) -> str | None:
        """None when every rank is alive, else why not."""
        if self.failure is None:
            self.failure = self._dead_worker()
        return self.failure

    def execute_model(self, out: Any) -> Any:
        """Broadcast `out` (a SchedulerOutput or a CaptureDecodeGraphs), run it on the driver's
        shard; WorkerDiedError when a rank is gone."""
        self._raise_if_failed()
        try:
            broadcast_step(self.parallel, out)
            if isinstance(out, CaptureDecodeGraphs):
                return out.apply(self.driver_runner)
            return self.driver_runner.execute_model(out)
        except Exception as exc:
            dead = self._wait_for_dead_worker()
            if dead is not None:
                self.failure = dead
                raise WorkerDiedError(dead) from exc
            self.failure = f"tensor-parallel step failed on rank 0: {type(exc).__name__}: {exc}"
            raise TensorParallelError(self.failure) from exc

    def capture_decode_graphs(self, enforce_eager: bool, max_num_seqs: int, max_model_len: int,
                              torchair_graph: bool = False) -> None:
        """Every rank builds its decode graphs (captured together: the forward runs collectives)."""
        self.execute_model(CaptureDecodeGraphs(enforce_eager, max_num_seqs, max_model_len, torchair_graph))

    def _raise_if_failed(self) -> None:
        if self.failure is None:
            self.failure = self._dead_worker()
        if self.failure is not None:
            died = self.failure.startswith("tensor-parallel worker")
            raise (WorkerDiedError if died else TensorParallelError)(self.failure)

    def _wait_for_dead_worker(self, wait_s: float = _DEATH_POLL_S) -> str | None:
        deadline = time.monotonic() + wait_s
        while True:
            dead = self._dead_worker()
            if dead is not None or time.monotonic() > deadline:
                return dead
            time.sleep(0.05)

    def _dead_worker(self) -> str | None:
        return None

    def shutdown(self) -> None:
        """Send the stop message and leave the group (idempotent)."""


class MultiprocExecutor(DriverExecutor):
    """`mp`: tp_size - 1 worker processes on this node (fork or spawn, `start_method`); this
    process is rank 0. Start-up waits for the workers' reports while watching their processes,
    so a worker that dies is reported at once (rank, exit code, message)."""

    def __init__(self, spec: WorkerSpec, tp_size: int) -> None:
        method = choose_start_method(ProcessFacts.observe(spec.backend))
        if method.warning:
            logger.warning(method.warning)
        logger.info("tensor parallel: starting %d worker process(es) with %s: %s", tp_size - 1,
                    method.name, method.reason)
        init_method = f"tcp://127.0.0.1:{free_port()}"
        self._workers = start_workers(method, tp_size, init_method, spec)
        self._finalizer = weakref.finalize(self, stop_processes, [w.process for w in self._workers])
        self.failure = None
        parallel = None
        try:
            await_reports(self._workers, "joining", spec.timeout_s)
            parallel = init_parallel_context(0, tp_size, spec.backend, init_method, 0, spec.timeout_s)
            runner = spec.build_runner(parallel)
            await_reports(self._workers, "ready", spec.timeout_s)
        except Exception as exc:
            self._startup_failed(exc, parallel)
        super().__init__(parallel, runner)
        self._stopped = False
        logger.info("tensor parallel: %d ranks ready (mp executor)", tp_size)

    def _startup_failed(self, exc: Exception, parallel: ParallelContext | None) -> None:
        """Raise the first worker's start-up error (rank and message), else the driver's own."""
        if isinstance(exc, WorkerDiedError):
            reported: str | None = str(exc)
        elif isinstance(exc, TensorParallelError):     # a worker still running past the time-out
            reported = None
        else:                                          # e.g. a collective that lost its peer
            reported = first_failure(self._workers, _STARTUP_POLL_S)
        if parallel is not None:
            destroy_parallel_context(parallel, barrier=False)
        stop_processes([w.process for w in self._workers])
        if reported is not None:
            raise WorkerDiedError(f"tensor-parallel start-up failed: {reported}") from exc
        raise exc

    def _dead_worker(self) -> str | None:
        return first_failure(self._workers)

    def shutdown(self) -> None:
        if getattr(self, "_stopped", True):
            return
        self._stopped = True
        alive = self.failure is None and self._dead_worker() is None
        if alive:
            try:
                broadcast_step(self.parallel, None)
            except Exception as exc:
                logger.warning("could not send the stop message to the workers: %s", exc)
                alive = False
        destroy_parallel_context(self.parallel, barrier=alive)
        stop_processes([w.process for w in self._workers])


class ExternalLaunchExecutor(DriverExecutor):
    """Rank 0 of a torchrun-style launch: the other ranks were started by the launcher."""

    def shutdown(self) -> None:
        if getattr(self, "_stopped", False):
            return
        self._stopped = True
        try:
            broadcast_step(self.parallel, None)
        finally:
            destroy_parallel_context(self.parallel)
