"""`--distributed-executor-backend mp` (the default): start the worker ranks, broadcast every step, watch them.

`MultiprocExecutor` starts tp_size - 1
worker processes on this node (fork or spawn: `start_method`); the engine process is rank 0 and runs its own shard. With
torchrun-style env (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) every rank is launched from
outside: rank 0 drives (`ExternalLaunchExecutor`, in `base`), the others run the worker loop.

A worker that dies is reported as `WorkerDiedError` naming its rank and exit code (at once during
start-up, before every step, and when a collective fails) instead of a hang; the process-group timeout bounds
the wait for a rank that hangs without dying.
"""
from __future__ import annotations

import logging
import threading
import weakref

from ascend_llm.distributed.parallel_state import (ParallelContext, destroy_parallel_context, free_port,
                                                   init_parallel_context)
from ascend_llm.executor.base import DriverExecutor
from ascend_llm.executor.errors import TensorParallelError, WorkerDiedError
from ascend_llm.executor.start_method import ProcessFacts, choose_start_method
from ascend_llm.executor.worker import WorkerSpec, broadcast_step
from ascend_llm.executor.worker_processes import (SIGNAL_WAIT_S, await_reports, first_failure, start_workers,
                                                  stop_processes)

logger = logging.getLogger(__name__)

_STARTUP_POLL_S = 15.0   # after a failed start-up: how long to wait for a worker's own report
STOP_TIMEOUT_S = 10.0    # shutdown: how long the stop message and leaving the group may take


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
        """Send the stop message and leave the group, bounded by STOP_TIMEOUT_S: a worker that is
        alive but does not take part (stopped, stuck, dying slowly) would otherwise block the
        broadcast, whose control group has no practical timeout. Past the bound the workers are
        terminated (which fails the blocked collective) instead of waited for."""
        if getattr(self, "_stopped", True):
            return
        self._stopped = True
        alive = self.failure is None and self._dead_worker() is None
        leaving = threading.Thread(target=self._leave_group, args=(alive,), name="ascend-llm-tp-stop", daemon=True)
        leaving.start()
        leaving.join(STOP_TIMEOUT_S)
        if leaving.is_alive():
            logger.warning("tensor parallel: the stop message / leaving the process group did not finish within "
                           "%.0f s (a worker rank is alive but not answering): terminating the workers",
                           STOP_TIMEOUT_S)
            stop_processes([w.process for w in self._workers], grace_s=0.0)
            leaving.join(SIGNAL_WAIT_S)      # the terminated workers fail the blocked collective
            return
        stop_processes([w.process for w in self._workers])

    def _leave_group(self, alive: bool) -> None:
        if alive:
            try:
                broadcast_step(self.parallel, None)
            except Exception as exc:
                logger.warning("could not send the stop message to the workers: %s", exc)
                alive = False
        destroy_parallel_context(self.parallel, barrier=alive)
