"""Driver side of tensor parallelism: the executor the engine (rank 0) steps through.

`DriverExecutor` broadcasts every step to the worker ranks and runs it on the driver's own shard;
a worker that dies is reported as `WorkerDiedError` naming its rank (before every step, and when a
collective fails) instead of a hang. `ExternalLaunchExecutor` is rank 0 of a torchrun-style
launch (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): every rank was started from outside, the
others run the worker loop. The `mp` and `ray` executors (`multiproc`, `ray`) subclass it.
"""
from __future__ import annotations

import time
from typing import Any

from ascend_llm.distributed.parallel_state import ParallelContext, destroy_parallel_context
from ascend_llm.executor.errors import TensorParallelError, WorkerDiedError
from ascend_llm.executor.worker import CaptureDecodeGraphs, broadcast_step

_DEATH_POLL_S = 3.0      # after a failed collective: how long to wait for a peer's exit status


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
