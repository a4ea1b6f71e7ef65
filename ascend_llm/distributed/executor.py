"""Driver side of tensor parallelism: start the worker ranks, broadcast every step, watch them.

`MultiprocExecutor` (`--distributed-executor-backend mp`, the default) spawns tp_size - 1
worker processes on this node; the engine process is rank 0 and runs its own shard. With
torchrun-style env (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) every rank is launched from
outside: rank 0 drives (`ExternalLaunchExecutor`), the others run the worker loop.

A worker that dies is reported as `WorkerDiedError` naming its rank and exit code (checked before
every step, and when a collective fails) instead of a hang; the process-group timeout bounds
the wait for a rank that hangs without dying.
"""
from __future__ import annotations

import logging
import multiprocessing
import time
import weakref
from typing import Any

from ascend_llm.distributed.parallel_state import (ParallelContext, destroy_parallel_context, free_port,
                                                   init_parallel_context)
from ascend_llm.distributed.worker import CaptureDecodeGraphs, WorkerSpec, broadcast_step, mp_worker_entry

logger = logging.getLogger(__name__)

_EXIT_GRACE_S = 5.0      # how long a worker may take to exit after the stop message
_DEATH_POLL_S = 3.0      # after a failed collective: how long to wait for a peer's exit status
_STARTUP_POLL_S = 15.0   # after a failed start-up: how long to wait for a worker's own report


class TensorParallelError(RuntimeError):
    """A tensor-parallel step failed; the ranks may be out of step, so the engine cannot step
    any more (fatal: the server turns unhealthy instead of retrying)."""
    fatal = True


class WorkerDiedError(TensorParallelError):
    """A tensor-parallel rank is gone."""


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
    """`mp`: tp_size - 1 spawned worker processes on this node; this process is rank 0."""

    def __init__(self, spec: WorkerSpec, tp_size: int) -> None:
        init_method = f"tcp://127.0.0.1:{free_port()}"
        context = multiprocessing.get_context("spawn")
        self._procs: list[Any] = []
        self._conns: list[Any] = []
        for rank in range(1, tp_size):
            receiver, sender = context.Pipe(duplex=False)
            proc = context.Process(target=mp_worker_entry, name=f"ascend-llm-tp-rank{rank}", daemon=True,
                                   args=(rank, tp_size, init_method, spec, sender))
            proc.start()
            sender.close()
            self._procs.append(proc)
            self._conns.append(receiver)
        self._finalizer = weakref.finalize(self, _stop_processes, self._procs)
        self.failure = None
        try:
            parallel = init_parallel_context(0, tp_size, spec.backend, init_method, 0, spec.timeout_s)
        except Exception as exc:
            self._startup_failed(exc, None)
        try:
            runner = spec.build_runner(parallel)
            self._wait_ready()
        except Exception as exc:
            self._startup_failed(exc, parallel)
        super().__init__(parallel, runner)
        self._stopped = False
        logger.info("tensor parallel: %d ranks ready (mp executor)", tp_size)

    def _startup_failed(self, exc: Exception, parallel: ParallelContext | None) -> None:
        """Raise the first worker's start-up error (rank and message), else the driver's own."""
        reported = self._wait_for_dead_worker(_STARTUP_POLL_S)
        if parallel is not None:
            destroy_parallel_context(parallel, barrier=False)
        _stop_processes(self._procs)
        if reported is not None:
            raise RuntimeError(f"tensor-parallel start-up failed: {reported}") from exc
        raise exc

    def _wait_ready(self) -> None:
        for rank, conn in enumerate(self._conns, start=1):
            while not conn.poll(0.1):
                if not self._procs[rank - 1].is_alive():
                    raise WorkerDiedError(self._describe(rank))
            kind, _, message = conn.recv()
            if kind != "ready":
                raise WorkerDiedError(f"tensor-parallel worker rank {rank} failed: {message}")

    def _dead_worker(self) -> str | None:
        for rank, proc in enumerate(self._procs, start=1):
            if not proc.is_alive():
                return self._describe(rank)
        return None

    def _describe(self, rank: int) -> str:
        proc, conn = self._procs[rank - 1], self._conns[rank - 1]
        proc.join(timeout=1.0)
        message = ""
        try:
            while conn.poll(0):
                kind, _, text = conn.recv()
                message = text if kind == "error" else message
        except (EOFError, OSError):
            pass
        text = f"tensor-parallel worker rank {rank} exited with code {proc.exitcode}"
        return f"{text}: {message}" if message else text

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
        _stop_processes(self._procs)


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


def _stop_processes(procs: list[Any]) -> None:
    """Wait briefly for workers to exit on their own, then terminate (and kill) the rest."""
    deadline = time.monotonic() + _EXIT_GRACE_S
    for proc in procs:
        proc.join(timeout=max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=2.0)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=2.0)
