"""The `mp` executor's worker processes: start them, wait for their reports while watching that
they live, describe the ones that die, stop them.

Each worker reports over its own pipe as (kind, rank, message): "joining" just before it blocks in
the rendezvous, "ready" once its shard is built, "error" before it exits on a failure. The driver
waits for a kind with `await_reports`, which wakes on a report or on a process's exit
(`multiprocessing.connection.wait` on the pipes and the process sentinels), so a worker that dies
during start-up is reported at once with its rank, exit code and message, not after the
rendezvous time-out.
"""
from __future__ import annotations

import logging
import multiprocessing
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_any
from typing import Any

from ascend_llm.executor.errors import TensorParallelError, WorkerDiedError
from ascend_llm.executor.start_method import StartMethod, hidden_main_file
from ascend_llm.executor.worker import WorkerSpec, mp_worker_entry

logger = logging.getLogger(__name__)

EXIT_GRACE_S = 5.0      # how long a worker may take to exit after the stop message
SIGNAL_WAIT_S = 2.0     # how long to wait after SIGTERM, then after SIGKILL


@dataclass
class WorkerProcess:
    """One worker rank's process and the driver's end of its report pipe."""
    rank: int
    process: Any
    conn: Any
    start_method: str
    seen: set[str] = field(default_factory=set)
    error: str | None = None
    pipe_open: bool = True

    def receive(self) -> None:
        """Read every report waiting on the pipe (never blocks)."""
        try:
            while self.pipe_open and self.conn.poll(0):
                kind, _, message = self.conn.recv()
                self.seen.add(kind)
                if kind == "error":
                    self.error = message
        except (EOFError, OSError):
            self.pipe_open = False

    def failed(self) -> bool:
        """True once the worker reported an error or its process is gone."""
        self.receive()
        return self.error is not None or not self.process.is_alive()

    def describe(self) -> str:
        """'tensor-parallel worker rank R exited with code C: message' (waits up to 1 s for the
        exit code of a worker that has just reported its error)."""
        self.process.join(timeout=1.0)
        self.receive()
        text = f"tensor-parallel worker rank {self.rank} exited with code {self.process.exitcode}"
        if self.error:
            return f"{text}: {self.error}"
        if not self.seen:
            return f"{text} before it ran the worker code ({self._early_exit_hint()})"
        return text

    def _early_exit_hint(self) -> str:
        if self.start_method == "fork":
            return "its traceback is on stderr"
        return (f"its traceback is on stderr; with the {self.start_method} start method each worker first "
                f"re-runs the main module, so a script must create the LLM under "
                f"`if __name__ == \"__main__\":`, or set VLLM_WORKER_MULTIPROC_METHOD=fork")


def start_workers(method: StartMethod, tp_size: int, init_method: str, spec: WorkerSpec) -> list[WorkerProcess]:
    """Start ranks 1..tp_size-1 with `method` (daemon processes, one report pipe each)."""
    context = multiprocessing.get_context(method.name)
    workers = []
    with hidden_main_file(method.hide_main_file):
        for rank in range(1, tp_size):
            receiver, sender = context.Pipe(duplex=False)
            process = context.Process(target=mp_worker_entry, name=f"ascend-llm-tp-rank{rank}", daemon=True,
                                      args=(rank, tp_size, init_method, spec, sender))
            workers.append(WorkerProcess(rank, process, receiver, method.name))
            process.start()
            sender.close()      # only the child holds the sending end: its exit closes the pipe
    return workers


def await_reports(workers: list[WorkerProcess], kind: str, timeout_s: float) -> None:
    """Return once every worker has reported `kind`; WorkerDiedError as soon as one reports an
    error or exits, TensorParallelError when `timeout_s` passes first."""
    deadline = time.monotonic() + timeout_s
    waiting = list(workers)
    while True:
        for worker in waiting:
            if worker.failed():
                raise WorkerDiedError(worker.describe())
        waiting = [w for w in waiting if kind not in w.seen]
        left = deadline - time.monotonic()
        if not waiting:
            return
        if left <= 0:
            ranks = ", ".join(str(w.rank) for w in waiting)
            raise TensorParallelError(f"tensor-parallel worker rank(s) {ranks} did not report {kind!r} "
                                      f"within {timeout_s:.0f} s (still running)")
        handles = [w.conn for w in waiting if w.pipe_open] + [w.process.sentinel for w in waiting]
        wait_any(handles, timeout=left)


def first_failure(workers: list[WorkerProcess], timeout_s: float = 0.0) -> str | None:
    """The description of a worker that failed, waiting up to `timeout_s` for one; else None."""
    deadline = time.monotonic() + timeout_s
    while True:
        for worker in workers:
            if worker.failed():
                return worker.describe()
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        wait_any([w.conn for w in workers if w.pipe_open] + [w.process.sentinel for w in workers],
                 timeout=left)


def stop_processes(procs: list[Any], grace_s: float = EXIT_GRACE_S) -> None:
    """Wait up to `grace_s` for workers to exit on their own, then terminate (and kill) the rest,
    logging each escalation; returns within grace_s + 4 s."""
    deadline = time.monotonic() + grace_s
    for proc in procs:
        proc.join(timeout=max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            logger.warning("tensor parallel: worker %s (pid %s) still running %.0f s after the stop message: "
                           "SIGTERM", proc.name, proc.pid, grace_s)
            proc.terminate()
            proc.join(timeout=SIGNAL_WAIT_S)
        if proc.is_alive():
            logger.warning("tensor parallel: worker %s (pid %s) ignored SIGTERM: SIGKILL", proc.name, proc.pid)
            proc.kill()
            proc.join(timeout=SIGNAL_WAIT_S)
