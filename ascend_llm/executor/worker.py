"""A tensor-parallel worker rank: build this rank's model shard, then run every step the
driver broadcasts until it broadcasts the stop message.

The same loop serves processes started by the `mp` executor, Ray actors and torchrun-launched
ranks. Progress and failures go back to the driver through `report` (a pipe end for `mp`) as
(kind, rank, message): "joining" just before the rendezvous, "ready" once the shard is built,
"error" before the worker exits with a non-zero code.
"""
from __future__ import annotations

import logging
import os
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from ascend_llm.config import CacheConfig, ModelConfig
from ascend_llm.distributed.parallel_state import (DEFAULT_TIMEOUT_S, ParallelContext,
                                                   destroy_parallel_context, init_parallel_context)

logger = logging.getLogger(__name__)

Report = Callable[[tuple[str, int, str]], None]


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a rank needs to build its `ModelRunner` (picklable)."""
    model_config: ModelConfig
    cache_config: CacheConfig
    model_dir: str
    backend: str
    eos_token_ids: frozenset[int]
    timeout_s: float = DEFAULT_TIMEOUT_S

    def build_runner(self, parallel: ParallelContext) -> Any:
        from ascend_llm.engine.model_runner import ModelRunner
        from ascend_llm.loader import load_hf_config
        model_dir = Path(self.model_dir)
        return ModelRunner(self.model_config, self.cache_config, load_hf_config(model_dir), model_dir,
                           self.backend, set(self.eos_token_ids), parallel)


@dataclass(frozen=True)
class CaptureDecodeGraphs:
    """Broadcast once after start-up: every rank builds (and captures) its decode graphs with
    these engine settings, in step with the others (the captured forward runs collectives)."""
    enforce_eager: bool
    max_num_seqs: int
    max_model_len: int
    torchair_graph: bool = False

    def apply(self, runner: Any) -> None:
        from ascend_llm.graph.model_graphs import create_decode_graphs
        runner.decode_graphs = create_decode_graphs(runner, self.enforce_eager, self.max_num_seqs,
                                                    self.max_model_len, self.torchair_graph)


def broadcast_step(parallel: ParallelContext, payload: Any = None) -> Any:
    """Driver: send `payload` (a SchedulerOutput, or None to stop); workers: receive it."""
    box = [payload if parallel.is_driver else None]
    dist.broadcast_object_list(box, src=0, group=parallel.cpu_group)
    return box[0]


def run_worker_loop(parallel: ParallelContext, runner: Any) -> int:
    """Run broadcast steps until the stop message; returns the number of steps run."""
    steps = 0
    while True:
        out = broadcast_step(parallel)
        if out is None:
            return steps
        if isinstance(out, CaptureDecodeGraphs):
            out.apply(runner)
            continue
        runner.execute_model(out)
        steps += 1


def worker_main(rank: int, world_size: int, init_method: str, spec: WorkerSpec,
                report: Report, local_rank: int | None = None) -> None:
    """Entry point of a worker rank (returns normally after the driver's stop message)."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads())
    phase = "start-up"
    parallel = None
    try:
        parallel = init_parallel_context(rank, world_size, spec.backend, init_method, local_rank,
                                         spec.timeout_s, before_rendezvous=lambda: report(("joining", rank, "")))
        runner = spec.build_runner(parallel)
        report(("ready", rank, str(runner.num_blocks)))
        phase = "step"
        steps = run_worker_loop(parallel, runner)
        logger.info("rank %d: stop after %d steps", rank, steps)
    except BaseException as exc:
        logger.error("rank %d failed during %s:\n%s", rank, phase, traceback.format_exc())
        report(("error", rank, f"{phase}: {type(exc).__name__}: {exc}"))
        raise SystemExit(1) from exc
    destroy_parallel_context(parallel)


def pipe_report(conn: Any) -> Report:
    """A `Report` that sends over a multiprocessing connection (ignoring a closed one)."""
    def send(message: tuple[str, int, str]) -> None:
        try:
            conn.send(message)
        except (OSError, ValueError):
            pass
    return send


def mp_worker_entry(rank: int, world_size: int, init_method: str, spec: WorkerSpec, conn: Any) -> None:
    """Target of an `mp` worker process (forked or spawned).

    Logging is configured afresh (a forked child inherits the parent's handlers, which may write
    to places only the parent reads). The worker runs on a new thread: the parent's OpenMP pool,
    when it has run torch ops, belongs to the forking thread and its workers did not survive the
    fork, so that thread's first parallel op would hang (libgomp); a new thread builds a new pool.
    """
    logging.basicConfig(level=logging.INFO, format=f"[tp rank {rank}] %(levelname)s %(name)s: %(message)s",
                        force=True)
    run_on_new_thread(worker_main, rank, world_size, init_method, spec, pipe_report(conn))


def run_on_new_thread(fn: Callable[..., None], *args: Any) -> None:
    """Run `fn(*args)` on a new thread and wait for it; its exception (SystemExit included) is
    raised again here. The thread is a daemon: a process leaving on a signal (KeyboardInterrupt
    in this thread) does not wait for it."""
    raised: list[BaseException] = []

    def body() -> None:
        try:
            fn(*args)
        except BaseException as exc:   # carried to the calling thread
            raised.append(exc)

    thread = threading.Thread(target=body, name=threading.current_thread().name, daemon=True)
    thread.start()
    thread.join()
    if raised:
        raise raised[0]
