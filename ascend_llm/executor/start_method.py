"""How the `mp` executor starts its worker processes: `fork` or `spawn` (or `forkserver`).

The rule, in order (`choose_start_method`; the executor logs the choice and its reason):
1. `ASCEND_LLM_WORKER_MULTIPROC_METHOD`, else vLLM's `VLLM_WORKER_MULTIPROC_METHOD`, when set:
   that method; except `fork` after this process initialised CUDA / the NPU, which becomes
   `spawn` with a warning (a forked child cannot use the parent's device context).
2. Not Linux: `spawn` (no fork on Windows; on macOS system libraries crash after fork).
3. Backend `cuda` or `npu`: `spawn`. The engine has already asked the runtime for its devices:
   `torch.cuda.is_available()` may initialise the CUDA driver, which a forked child cannot use
   (unless PYTORCH_NVML_BASED_CUDA_CHECK=1), and torch_npu refuses to start in a forked child
   ("Cannot re-initialize NPU in forked subprocess"; vLLM-Ascend sets spawn for the same reason).
4. The workers are started from a thread other than the main one while the main thread runs
   on (the server loads its engine on a thread while its asyncio loop answers /health), and
   spawn can re-create the main module: `spawn`. A forked child holds only the forking thread;
   a lock the busy main thread held at that instant (a log stream being written) stays locked
   in the child for ever. Idle helper threads of a program that builds its engine on the main
   thread (tqdm's monitor, a notebook kernel's I/O threads) do not count: they are only logged.
5. Otherwise `fork`: nothing to re-import, so it works from a notebook, `python -` and scripts
   without an `if __name__ == "__main__":` guard, and starts in a fraction of spawn's time.
   The OpenMP pool of a parent that already ran torch ops does not survive the fork (libgomp
   hangs the child's first parallel op); the worker therefore runs in a fresh thread of its
   own, which builds a new pool (`worker.mp_worker_entry`).

Spawn re-runs the parent's main module in each child from its `__file__`. A program read from
stdin (`python -`) or a string has a `__file__` naming no file: while the workers start it is
hidden (`hidden_main_file`), so they start like children of a notebook, which need nothing from
`__main__` (the worker's code lives in ascend_llm). A script without a main guard cannot be told
apart from one with it; under spawn its children re-run it and die at once, which the executor
reports with the fix.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import torch

START_METHOD_ENVS = ("ASCEND_LLM_WORKER_MULTIPROC_METHOD", "VLLM_WORKER_MULTIPROC_METHOD")
START_METHODS = ("fork", "spawn", "forkserver")
_RESPAWNABLE_SUFFIXES = ("", ".py", ".pyw", ".pyc", ".pyz", ".zip")


@dataclass(frozen=True)
class MainModule:
    """What a spawned child would re-create of `__main__`: its module name (`python -m`), else
    its `__file__` (None for a notebook or `python -c`)."""
    name: str | None = None
    file: str | None = None

    @classmethod
    def current(cls) -> "MainModule":
        main = sys.modules.get("__main__")
        spec = getattr(main, "__spec__", None)
        return cls(getattr(spec, "name", None), getattr(main, "__file__", None))

    @property
    def unrunnable_file(self) -> bool:
        """A `__file__` a spawned child cannot run (`<stdin>`, `<string>`, a notebook)."""
        if self.name is not None or self.file is None:
            return False
        path = Path(self.file)
        return not (path.exists() and path.suffix in _RESPAWNABLE_SUFFIXES)

    @property
    def respawnable(self) -> bool:
        """True when a spawned child can re-create this main module (a module or script file)."""
        return self.name is not None or (self.file is not None and not self.unrunnable_file)


@dataclass(frozen=True)
class ProcessFacts:
    """What decides the start method, observed in this (the driver's) process."""
    platform: str
    backend: str
    initialised_devices: tuple[str, ...] = ()
    other_threads: tuple[str, ...] = ()
    main: MainModule = MainModule()
    main_thread_busy: bool = False

    @classmethod
    def observe(cls, backend: str) -> "ProcessFacts":
        current, main = threading.current_thread(), threading.main_thread()
        threads = tuple(t.name for t in threading.enumerate() if t is not current and t.is_alive())
        busy = current is not main and main.is_alive()
        return cls(sys.platform, backend, initialised_devices(), threads, MainModule.current(), busy)


@dataclass(frozen=True)
class StartMethod:
    """The chosen method, why, and whether `__main__.__file__` must be hidden from children."""
    name: str
    reason: str
    hide_main_file: bool = False
    warning: str | None = None


def initialised_devices() -> tuple[str, ...]:
    """Accelerator runtimes initialised in this process ('cuda', 'npu'); never initialises one."""
    found = []
    if torch.cuda.is_initialized():
        found.append("cuda")
    npu = getattr(torch, "npu", None) if "torch_npu" in sys.modules else None
    is_initialized = getattr(npu, "is_initialized", None)
    if callable(is_initialized) and is_initialized():
        found.append("npu")
    return tuple(found)


def requested_start_method(environ: Mapping[str, str]) -> tuple[str, str] | None:
    """(variable, method) from the first start-method variable set, or None; ValueError when the
    value is not a multiprocessing start method."""
    for variable in START_METHOD_ENVS:
        value = environ.get(variable, "").strip().lower()
        if value:
            if value not in START_METHODS:
                raise ValueError(f"{variable}: {value!r} is not one of {list(START_METHODS)}")
            return variable, value
    return None


def choose_start_method(facts: ProcessFacts, environ: Mapping[str, str] = os.environ) -> StartMethod:
    """The start method for tensor-parallel workers (the module docstring gives the rule)."""
    requested = requested_start_method(environ)
    if requested is not None:
        return _explicit(requested, facts)
    if not facts.platform.startswith("linux"):
        return _spawn(facts, f"the platform is {facts.platform}, where fork is unsafe or missing")
    if facts.backend in ("cuda", "npu"):
        return _spawn(facts, f"the {facts.backend} runtime does not survive fork (this process has "
                             f"already asked it for devices)")
    if facts.main_thread_busy and facts.main.respawnable:
        return _spawn(facts, "the workers are started off the main thread while it runs on; a forked "
                             "worker would inherit any lock it holds")
    threads = f" (other threads: {', '.join(facts.other_threads)})" if facts.other_threads else ""
    if facts.main_thread_busy:
        return StartMethod("fork", f"the main module cannot be re-imported by a spawned worker{threads}")
    return StartMethod("fork", f"no device runtime or busy main thread makes fork unsafe{threads}")


def _explicit(requested: tuple[str, str], facts: ProcessFacts) -> StartMethod:
    variable, method = requested
    if method == "fork" and facts.initialised_devices:
        devices = " and ".join(facts.initialised_devices)
        warning = (f"{variable}=fork, but {devices} is already initialised in this process and a forked "
                   f"worker cannot use it: starting the workers with spawn instead")
        return _spawn(facts, f"{devices} is initialised ({variable}=fork overridden)", warning)
    if method == "fork":
        return StartMethod("fork", f"{variable}=fork")
    return _spawn(facts, f"{variable}={method}", method=method)


def _spawn(facts: ProcessFacts, reason: str, warning: str | None = None,
           method: str = "spawn") -> StartMethod:
    hide = facts.main.unrunnable_file
    if hide:
        reason += f"; the main module's file {facts.main.file!r} cannot be re-run, so the workers start without it"
    return StartMethod(method, reason, hide, warning)


@contextlib.contextmanager
def hidden_main_file(hide: bool) -> Iterator[None]:
    """With `hide`, remove `__main__.__file__` while workers start (restored afterwards), so a
    spawned child does not try to re-run a program that has no file (`python -`)."""
    main = sys.modules.get("__main__")
    if not hide or main is None or not hasattr(main, "__file__"):
        yield
        return
    saved = main.__file__
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = saved
