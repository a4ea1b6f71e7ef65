"""cpu_extension: the one-per-machine build of our C++ CPU kernels, its cache key, and loads of
the cached library by processes that start together."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ascend_llm.ops import cpu_extension

needs_build = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                 reason="no C++ compiler on this machine: the kernels cannot be built")


def test_cache_key_follows_sources_torch_and_cpu(monkeypatch):
    first = cpu_extension.build_directory()
    monkeypatch.setattr(cpu_extension, "_cpu_flags", lambda: "flags : something else")
    assert cpu_extension.build_directory() != first
    assert first.parent.name == "ext"


def test_pip_ninja_found_without_an_activated_venv(monkeypatch):
    ninja = pytest.importorskip("ninja")
    monkeypatch.setenv("PATH", "/nonexistent")
    cpu_extension.ensure_ninja_on_path()
    found = shutil.which("ninja")
    assert found is not None and Path(found).parent in (Path(ninja.BIN_DIR), Path(sys.executable).parent)


_CHILD = """
import logging, sys, torch
logging.basicConfig(level=logging.INFO, stream=sys.stdout)
from ascend_llm.ops import cpu_extension
assert cpu_extension.extension_unavailable() is None, cpu_extension.extension_unavailable()
x, w = torch.randn(1, 40), torch.randn(7, 40)
torch.testing.assert_close(torch.ops.ascend_llm_cpu.gemv(x, w, None), x @ w.t(), rtol=1e-5, atol=1e-5)
y = torch.randn(3, 40)
torch.testing.assert_close(torch.ops.ascend_llm_cpu.rms_norm(y, w[0], 1e-6),
                           torch.nn.functional.rms_norm(y, (40,), w[0], 1e-6), rtol=1e-5, atol=1e-5)
print("CHILD OK")
"""


@needs_build
@pytest.mark.slow
def test_concurrent_first_builds_then_plain_loads(tmp_path):
    """Two processes building into an empty cache at once both work; a later one only loads."""
    env = {**os.environ, "ASCEND_LLM_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 and "CHILD OK" in out for p, out in zip(procs, outputs)), outputs
    folders = list((tmp_path / "ext").iterdir())
    assert len(folders) == 1 and [f.name for f in folders[0].iterdir()] == [cpu_extension.LIBRARY_NAME]
    later = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert later.returncode == 0 and "CHILD OK" in later.stdout
    assert "building" not in later.stdout + later.stderr


@needs_build
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one CPU: nothing to split over")
def test_kernels_run_on_torchs_threads():
    """Built with OpenMP: the kernels' parallel loops use every intra-op thread (without
    -fopenmp they silently ran on one, halving the GEMV's bandwidth on two cores)."""
    import torch
    assert cpu_extension.extension_unavailable() is None
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.ops.ascend_llm_cpu.parallel_workers() == 2
        torch.set_num_threads(1)
        assert torch.ops.ascend_llm_cpu.parallel_workers() == 1
    finally:
        torch.set_num_threads(old)
