"""Our C++ CPU kernels (csrc/*.cpp: the decode GEMV and the fused small ops of a decode step),
built once per machine into one library with torch's C++ extension loader.

The library is compiled on first use (~20 s, g++ and ninja, `-O3 -march=native -fopenmp`) into
`$ASCEND_LLM_CACHE/ext/` (default ~/.cache/ascend_llm/ext/) under a key of the sources, the build
flags, the torch version and the CPU's feature flags, and loaded from there afterwards (directly, without running
the build tools again). A build is staged in a private folder and moved in whole, so processes
starting together (tensor-parallel ranks) never see a half-written library. Without a compiler
`extension_unavailable()` says why, and the kernels that need the library step aside for the
reference ones in ops/cpu.py (and oneDNN / MKL for linear layers).
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

import torch

logger = logging.getLogger(__name__)

SOURCES = (Path(__file__).with_name("csrc") / "cpu_gemv.cpp",
           Path(__file__).with_name("csrc") / "cpu_decode.cpp")
LIBRARY_NAME = "ascend_llm_cpu.so"
# -fopenmp: at::parallel_for in the kernels is OpenMP in the headers; without it the loops run
# on one thread (the library then shares torch's libgomp, loaded first under the same soname)
CFLAGS = ("-O3", "-march=native", "-fopenmp")
LDFLAGS = ("-fopenmp",)


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
    """Where this machine's build lives: keyed by the sources, build flags, torch version and CPU flags."""
    from ascend_llm.loader.gguf_cache import cache_root
    key = hashlib.sha256(b"".join(source.read_bytes() for source in SOURCES)
                         + " ".join(CFLAGS + LDFLAGS).encode()
                         + torch.__version__.encode() + _cpu_flags().encode())
    return cache_root() / "ext" / f"cpu_kernels-{key.hexdigest()[:16]}"


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
    """Whether the library's ops (torch.ops.ascend_llm_cpu.*) are registered in this process."""
    try:
        torch.ops.ascend_llm_cpu.gemv
        torch.ops.ascend_llm_cpu.decode_attention
    except (AttributeError, RuntimeError):
        return False
    return True


def _build_into(directory: Path, final: Path) -> None:
    """Compile in a private staging folder (torch loads it from there), then move the library
    to `final` atomically: other processes only ever see a whole file, and never a rebuild."""
    from torch.utils.cpp_extension import load
    ensure_ninja_on_path()
    logger.info("building the CPU kernels once (about 20 s) into %s", directory)
    staging = Path(tempfile.mkdtemp(prefix="staging-", dir=directory))
    try:
        load(name=f"ascend_llm_cpu_{directory.name.split('-')[-1]}", sources=[str(s) for s in SOURCES],
             extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS), build_directory=str(staging),
             is_python_module=False, verbose=False)
        built = next(staging.glob("*.so"))
        os.replace(built, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@functools.lru_cache(maxsize=1)
def extension_unavailable() -> str | None:
    """Why the C++ kernels cannot run in this process (None: loaded). Builds them once per
    machine; later processes load the cached library without running the build tools."""
    if library_loaded():
        return None
    try:
        directory = build_directory()
        directory.mkdir(parents=True, exist_ok=True)
        final = directory / LIBRARY_NAME
        if final.exists():
            torch.ops.load_library(str(final))
        else:
            _build_into(directory, final)
    except Exception as exc:   # no compiler, no ninja, unwritable cache, build error: fall back
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        reason = f"the CPU C++ kernels could not be built ({type(exc).__name__}: {first[:200]})"
        logger.warning("%s; the reference CPU kernels (and oneDNN / MKL for linear layers) run instead",
                       reason)
        return reason
    return None
