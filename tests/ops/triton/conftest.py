"""Where the Triton kernel tests run.

Without a GPU (CI): Triton's interpreter on CPU tensors (TRITON_INTERPRET=1), every kernel
checked against the CPU references. With a GPU: the same tests compiled on it (inputs moved to
the GPU, compared on the CPU), which also catches what the interpreter cannot (compilation,
tile-shape limits, bf16 rounding). `ASCEND_LLM_TRITON_TEST_DEVICE=cpu|cuda` overrides the choice
(forcing cpu on a GPU machine: run this directory in its own pytest process, see below).

`triton.jit` picks the interpreter when a kernel is decorated, so this conftest imports the
kernel modules itself with TRITON_INTERPRET=1 set, then restores the environment; an autouse
fixture sets it again around each test here (the interpreter reads it while launching), so the
rest of a pytest session never sees it. Without triton every test here is skipped with that reason.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

DEVICE = os.environ.get("ASCEND_LLM_TRITON_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
if DEVICE not in ("cpu", "cuda"):
    raise ValueError(f"ASCEND_LLM_TRITON_TEST_DEVICE={DEVICE!r}: expected 'cpu' or 'cuda'")
TRITON_MISSING = importlib.util.find_spec("triton") is None
_HERE = Path(__file__).parent


def _reinterpret_triton_stdlib() -> None:
    """triton.language's own @jit helpers (tl.sum, tl.max, tl.cdiv, ...) are decorated when triton
    is first imported; in a pytest process that happens early (transformers imports it), before
    this file sets TRITON_INTERPRET, leaving them as GPU JITFunctions the interpreter cannot call.
    Re-executing those two pure-Python modules re-decorates them for the interpreter."""
    if "triton.language" not in sys.modules:
        return
    import triton.language as tl
    from triton.language import random, standard
    from triton.runtime.interpreter import InterpretedFunction
    if isinstance(standard.sum, InterpretedFunction):
        return
    for module in (standard, random):
        importlib.reload(module)
        for name, value in vars(module).items():
            if isinstance(value, InterpretedFunction) and hasattr(tl, name):
                setattr(tl, name, value)


def _import_kernels_for_the_interpreter() -> None:
    loaded = [name for name in sys.modules if name.startswith("ascend_llm.ops.triton.")]
    if loaded:
        raise RuntimeError(f"{loaded} were imported before TRITON_INTERPRET=1 was set; their "
                           f"kernels target a GPU. Run tests/ops/triton in its own pytest process.")
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        _reinterpret_triton_stdlib()
        for module in ("fp8", "hadamard", "int8_gemm", "norm_rope_act", "paged_attention", "weight_only", "weight_only_group"):
            importlib.import_module(f"ascend_llm.ops.triton.{module}")
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


if DEVICE == "cpu" and not TRITON_MISSING:
    _import_kernels_for_the_interpreter()


@pytest.fixture(autouse=True)
def _triton_interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = None
    if TRITON_MISSING:
        reason = "triton is not installed (pip install ascend-llm[cuda])"
    elif DEVICE == "cuda" and not torch.cuda.is_available():
        reason = "ASCEND_LLM_TRITON_TEST_DEVICE=cuda but no CUDA device is available"
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if _HERE in Path(str(item.fspath)).parents:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    """The device the kernels run on (references always run on the CPU)."""
    return torch.device(DEVICE)


@pytest.fixture
def seed() -> int:
    """A fresh seed per test (printed in assertion messages so a failure can be replayed)."""
    value = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(value)
    return value
