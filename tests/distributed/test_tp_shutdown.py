"""The mp executor's shutdown is bounded: a worker rank that is alive but never takes the stop
message (stopped, stuck, dying slowly under load) is terminated, then killed, with each step logged,
instead of blocking the broadcast on the control group, which has no practical timeout.

Before the bound, `MultiprocExecutor.shutdown` with a SIGSTOPped worker (tiny llama, --tp 2 on
gloo) did not return within 190 s; with it, 12 s."""
from __future__ import annotations

import logging
import multiprocessing
import signal
import time

from ascend_llm.executor import multiproc
from ascend_llm.executor.multiproc import MultiprocExecutor
from ascend_llm.executor.worker_processes import WorkerProcess


def _ignore_sigterm_and_sleep() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(60)


def test_shutdown_terminates_a_worker_that_never_takes_the_stop_message(monkeypatch, caplog):
    context = multiprocessing.get_context("fork")
    process = context.Process(target=_ignore_sigterm_and_sleep, name="ascend-llm-tp-rank1", daemon=True)
    process.start()
    receiver, sender = context.Pipe(duplex=False)
    sender.close()

    def blocked_broadcast(parallel, payload=None):     # gloo: the root waits for the peer's receive
        while process.is_alive():
            time.sleep(0.05)
        raise ConnectionError("Connection closed by peer")

    monkeypatch.setattr(multiproc, "broadcast_step", blocked_broadcast)
    monkeypatch.setattr(multiproc, "destroy_parallel_context", lambda parallel, barrier=True: None)
    monkeypatch.setattr(multiproc, "STOP_TIMEOUT_S", 0.5)
    executor = object.__new__(MultiprocExecutor)
    executor.parallel, executor.failure, executor._stopped = None, None, False
    executor._workers = [WorkerProcess(1, process, receiver, "fork")]
    try:
        started = time.monotonic()
        with caplog.at_level(logging.WARNING):
            executor.shutdown()
        elapsed = time.monotonic() - started
    finally:
        if process.is_alive():
            process.kill()
    assert elapsed < 6.0                      # 0.5 s bound + 2 s after SIGTERM + the kill
    assert not process.is_alive() and process.exitcode == -signal.SIGKILL
    text = caplog.text
    assert "did not finish within 0 s (a worker rank is alive but not answering): terminating" in text
    assert "ascend-llm-tp-rank1" in text and "SIGTERM" in text and "ignored SIGTERM: SIGKILL" in text
    assert "could not send the stop message to the workers: Connection closed by peer" in text
