"""`--distributed-executor-backend ray`: worker ranks as Ray actors (multi-node; optional extra).

Ray only places the processes: the ranks still join one torch.distributed group (hccl / nccl /
gloo) whose rendezvous is this driver's address, and run the same worker loop as `mp` workers.
Ray is not a dependency of ascend-llm; without it this backend fails with a clear error.
"""
from __future__ import annotations

import logging
import socket
from typing import Any

from ascend_llm.distributed.parallel_state import destroy_parallel_context, free_port, init_parallel_context
from ascend_llm.executor.base import DriverExecutor
from ascend_llm.executor.errors import WorkerDiedError
from ascend_llm.executor.worker import WorkerSpec, broadcast_step, worker_main

logger = logging.getLogger(__name__)


def import_ray() -> Any:
    """The `ray` module, or RuntimeError saying how to get it."""
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError("distributed_executor_backend 'ray' needs Ray, which is not installed: "
                           "pip install 'ray[default]' (or use the default 'mp' backend on one node, "
                           "or torchrun-style RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT)") from exc
    return ray


class _RankActor:
    """Body of one Ray actor: `run` blocks in the worker loop until the stop message."""

    def run(self, rank: int, world_size: int, init_method: str, spec: WorkerSpec) -> str:
        errors: list[str] = []
        try:
            worker_main(rank, world_size, init_method, spec, lambda m: errors.append(m[2]) if m[0] == "error" else None)
        except SystemExit:
            return errors[-1] if errors else "exited"
        return "ok"


class RayExecutor(DriverExecutor):
    """Rank 0 here; ranks 1..tp_size-1 as Ray actors (one accelerator each)."""

    def __init__(self, spec: WorkerSpec, tp_size: int) -> None:
        ray = import_ray()
        if not ray.is_initialized():
            # joins the cluster named by RAY_ADDRESS / the one running on this node, else starts one
            ray.init(ignore_reinit_error=True, include_dashboard=False)
        host = socket.gethostbyname(socket.gethostname())
        init_method = f"tcp://{host}:{free_port()}"
        gpus = 0 if spec.backend == "cpu" else 1
        actor_cls = ray.remote(num_cpus=1, num_gpus=gpus)(_RankActor)
        self._ray = ray
        self._actors = [actor_cls.remote() for _ in range(1, tp_size)]
        self._runs = [actor.run.remote(rank, tp_size, init_method, spec)
                      for rank, actor in enumerate(self._actors, start=1)]
        parallel = init_parallel_context(0, tp_size, spec.backend, init_method, 0, spec.timeout_s)
        super().__init__(parallel, spec.build_runner(parallel))
        self._stopped = False

    def _dead_worker(self) -> str | None:
        done, _ = self._ray.wait(self._runs, num_returns=len(self._runs), timeout=0)
        for ref in done:
            rank = self._runs.index(ref) + 1
            try:
                result = self._ray.get(ref)
            except Exception as exc:   # the actor died
                result = f"{type(exc).__name__}: {exc}"
            return f"tensor-parallel worker rank {rank} (ray actor) exited: {result}"
        return None

    def shutdown(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        alive = self.failure is None and self._dead_worker() is None
        if alive:
            broadcast_step(self.parallel, None)
        destroy_parallel_context(self.parallel, barrier=alive)
        for actor in self._actors:
            self._ray.kill(actor)


__all__ = ["RayExecutor", "WorkerDiedError", "import_ray"]
