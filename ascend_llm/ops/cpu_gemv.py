"""Float32 GEMV for CPU decode: our own small C++ kernel (csrc/cpu_gemv.cpp), built once per
machine with torch's C++ extension loader. Tested against ops/cpu.py's F.linear.

Decode at batch 1-4 is a matrix-vector product that has to stream every weight once. On the
2-vCPU AMD EPYC of CI, SmolLM2's 30 layers of weight-streaming went 20 -> 28 GB/s against
oneDNN's two-row trick (ops/cpu_onednn.py), and each call costs ~1 us instead of ~15 us; batch-1
decode went from 27 to 38 tok/s (benchmarks/bench_offline.py). The weight keeps its dense
[out, in] layout (a tied LM head stays shared with the embedding). Batches of more than four rows
go to oneDNN's GEMM on the same dense weight (MKL's F.linear on Intel CPUs, as in
ops/cpu_linear_choice.py).

The kernel is compiled on first use (~20 s, g++ and ninja, `-O3 -march=native`) into
`$ASCEND_LLM_CACHE/ext/` (default ~/.cache/ascend_llm/ext/) under a key of the source, the torch
version and the CPU's feature flags, and loaded from there afterwards (directly, without
running the build tools again; a build is staged privately and moved in whole, so processes
starting together, e.g. tensor-parallel ranks, never see a half-written library). Without a compiler the
kernel says why and the oneDNN / MKL kernels run instead. `ASCEND_LLM_CPU_LINEAR=onednn|mkl`
also steps it aside.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ascend_llm.ops.cpu_linear_choice import ENV_VAR, cpu_vendor, linear_choice
from ascend_llm.ops.registry import Kernel, OpRegistry

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "cpu_gemv.cpp"
MAX_ROWS = 4          # rows the kernel takes at once (csrc kMaxRows)


def _cpu_flags() -> str:
    """The `flags` line of /proc/cpuinfo (the -march=native build depends on it), or ""."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def build_directory() -> Path:
    """Where this machine's build lives: keyed by source, torch version and CPU flags."""
    from ascend_llm.loader.gguf_cache import cache_root
    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + _cpu_flags().encode())
    return cache_root() / "ext" / f"cpu_gemv-{key.hexdigest()[:16]}"


def ensure_ninja_on_path() -> None:
    """torch's extension loader runs `ninja` from PATH; a venv used without activation has the
    pip-installed one (our `ninja` dependency) only next to its python: add that folder."""
    if shutil.which("ninja") is not None:
        return
    folders = [Path(sys.executable).parent]
    try:
        import ninja
        folders.insert(0, Path(ninja.BIN_DIR))
    except (ImportError, AttributeError):
        pass
    for folder in folders:
        if (folder / "ninja").exists():
            os.environ["PATH"] = f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"
            return


def library_loaded() -> bool:
    """Whether torch.ops.ascend_llm_cpu.gemv is registered in this process already."""
    try:
        torch.ops.ascend_llm_cpu.gemv
    except (AttributeError, RuntimeError):
        return False
    return True


def _build_into(directory: Path, final: Path) -> None:
    """Compile in a private staging folder (torch loads it from there), then move the library
    to `final` atomically: other processes only ever see a whole file, and never a rebuild."""
    from torch.utils.cpp_extension import load
    ensure_ninja_on_path()
    logger.info("building the CPU GEMV kernel once (about 20 s) into %s", directory)
    staging = Path(tempfile.mkdtemp(prefix="staging-", dir=directory))
    try:
        load(name=f"ascend_llm_cpu_gemv_{directory.name.split('-')[-1]}", sources=[str(SOURCE)],
             extra_cflags=["-O3", "-march=native"], build_directory=str(staging),
             is_python_module=False, verbose=False)
        built = next(staging.glob("*.so"))
        os.replace(built, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@functools.lru_cache(maxsize=1)
def gemv_unavailable() -> str | None:
    """Why the GEMV kernel cannot run in this process (None: loaded). Builds it once per machine;
    later processes load the cached library without running the build tools."""
    if library_loaded():
        return None
    try:
        directory = build_directory()
        directory.mkdir(parents=True, exist_ok=True)
        final = directory / "ascend_llm_cpu_gemv.so"
        if final.exists():
            torch.ops.load_library(str(final))
        else:
            _build_into(directory, final)
    except Exception as exc:   # no compiler, no ninja, unwritable cache, build error: fall back
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        reason = f"the CPU GEMV kernel could not be built ({type(exc).__name__}: {first[:200]})"
        logger.warning("%s; float linear layers use oneDNN / MKL", reason)
        return reason
    return None


def _supports(dtype: torch.dtype | None = None, **traits: Any) -> str | None:
    if dtype != torch.float32:
        return f"dtype {dtype} is not float32"
    choice = linear_choice()
    if choice not in ("auto", "gemv"):
        return f"{ENV_VAR}={choice} selects another kernel"
    return gemv_unavailable()


def linear(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x: [num_tokens, in] -> [num_tokens, out]; 1-4 rows through the GEMV, more through a GEMM."""
    weight = layer.weight                                                   # [out, in] dense
    if 1 <= x.shape[0] <= MAX_ROWS and weight.is_contiguous():
        return torch.ops.ascend_llm_cpu.gemv(x, weight, bias)
    if cpu_vendor() != "GenuineIntel" and torch.backends.mkldnn.is_available():
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def register(registry: OpRegistry) -> None:
    registry.register(Kernel("linear", "cpu", "cpu.gemv_linear", linear, _supports, priority=20))
