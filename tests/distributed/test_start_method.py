"""How the `mp` executor starts and watches its workers, in one process: the start-method rule
(`choose_start_method` on given facts and environment), and `await_reports` waking at once when
a worker process exits or reports an error, naming its rank, exit code and message."""
from __future__ import annotations

import multiprocessing
import os
import sys
import time

import pytest

from ascend_llm.executor.errors import TensorParallelError, WorkerDiedError
from ascend_llm.executor.start_method import MainModule, ProcessFacts, choose_start_method, hidden_main_file
from ascend_llm.executor.worker_processes import WorkerProcess, await_reports

SCRIPT = MainModule(file=__file__)
STDIN = MainModule(file="<stdin>")


def _facts(**kwargs) -> ProcessFacts:
    return ProcessFacts(**{"platform": "linux", "backend": "cpu", "main": SCRIPT, **kwargs})


@pytest.mark.parametrize("facts, method", [
    (_facts(), "fork"),
    (_facts(main=STDIN), "fork"),
    (_facts(main=MainModule()), "fork"),                                    # a notebook
    (_facts(other_threads=("tqdm_monitor",)), "fork"),                      # idle helpers only
    (_facts(backend="npu"), "spawn"),
    (_facts(backend="cuda"), "spawn"),
    (_facts(platform="darwin"), "spawn"),
    (_facts(main_thread_busy=True, other_threads=("MainThread",)), "spawn"),   # the server
    (_facts(main_thread_busy=True, main=MainModule(name="ascend_llm.server.api_server")), "spawn"),
    (_facts(main_thread_busy=True, main=STDIN), "fork"),
])
def test_default_start_method(facts, method):
    chosen = choose_start_method(facts, {})
    assert chosen.name == method and chosen.reason and chosen.warning is None


def test_environment_chooses_and_ascend_name_wins():
    assert choose_start_method(_facts(backend="npu"), {"VLLM_WORKER_MULTIPROC_METHOD": "fork"}).name == "fork"
    assert choose_start_method(_facts(), {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}).name == "spawn"
    both = {"VLLM_WORKER_MULTIPROC_METHOD": "spawn", "ASCEND_LLM_WORKER_MULTIPROC_METHOD": "Fork"}
    assert choose_start_method(_facts(), both).name == "fork"
    with pytest.raises(ValueError, match=r"VLLM_WORKER_MULTIPROC_METHOD: 'threads' is not one of "
                                         r"\['fork', 'spawn', 'forkserver'\]"):
        choose_start_method(_facts(), {"VLLM_WORKER_MULTIPROC_METHOD": "threads"})


def test_fork_after_device_initialisation_becomes_spawn_with_a_warning():
    chosen = choose_start_method(_facts(initialised_devices=("cuda",)), {"VLLM_WORKER_MULTIPROC_METHOD": "fork"})
    assert chosen.name == "spawn"
    assert "cuda is already initialised in this process" in chosen.warning


def test_spawn_hides_a_main_file_that_cannot_be_rerun():
    assert choose_start_method(_facts(main=STDIN), {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}).hide_main_file
    assert not choose_start_method(_facts(), {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}).hide_main_file
    assert MainModule(file="/no/such/notebook.ipynb").unrunnable_file and not SCRIPT.unrunnable_file
    main = sys.modules["__main__"]
    had, saved = hasattr(main, "__file__"), getattr(main, "__file__", None)
    main.__file__ = "<stdin>"
    try:
        with hidden_main_file(True):
            assert not hasattr(main, "__file__")
        assert main.__file__ == "<stdin>"
    finally:
        if had:
            main.__file__ = saved
        else:
            del main.__file__


def _exit_early(conn, code: int) -> None:
    os._exit(code)


def _report_error(conn, code: int) -> None:
    conn.send(("joining", 1, ""))
    conn.send(("error", 1, "start-up: OSError: no such device"))
    os._exit(code)


def _hang(conn, code: int) -> None:
    conn.send(("joining", 1, ""))
    time.sleep(60)


def _start(target, code: int = 0) -> WorkerProcess:
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=target, args=(sender, code), daemon=True)
    process.start()
    sender.close()
    return WorkerProcess(1, process, receiver, "spawn")


@pytest.mark.parametrize("target, code, message", [
    (_exit_early, 3, r"^tensor-parallel worker rank 1 exited with code 3 before it ran the worker code "
                     r"\(its traceback is on stderr; .*`if __name__ == \"__main__\":`"),
    (_report_error, 1, r"^tensor-parallel worker rank 1 exited with code 1: start-up: OSError: no such device$"),
])
def test_a_worker_that_dies_is_reported_at_once(target, code, message):
    worker = _start(target, code)
    started = time.monotonic()
    with pytest.raises(WorkerDiedError, match=message):
        await_reports([worker], "ready", timeout_s=60)
    assert time.monotonic() - started < 5


def test_a_worker_that_hangs_is_reported_after_the_timeout():
    worker = _start(_hang)
    try:
        await_reports([worker], "joining", timeout_s=60)
        with pytest.raises(TensorParallelError, match=r"worker rank\(s\) 1 did not report 'ready' within 0 s"):
            await_reports([worker], "ready", timeout_s=0.3)
    finally:
        worker.process.kill()
        worker.process.join()
