"""benchmarks/gpu_session.sh and scripts/fetch_gpu_wheels.sh: shellcheck-clean, and the session
script refuses a bad mode and a machine without a CUDA device with a clear message (the GPU
steps themselves run only on a GPU machine)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.scripts.test_atlas_scripts import _shellcheck

ROOT = Path(__file__).resolve().parents[2]
SESSION = ROOT / "benchmarks" / "gpu_session.sh"
WHEELS = ROOT / "scripts" / "fetch_gpu_wheels.sh"


def _session(*args: str, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out)}
    return subprocess.run(["bash", str(SESSION), *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)


def test_scripts_are_shellcheck_clean():
    result = subprocess.run([_shellcheck(), str(SESSION), str(WHEELS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_unknown_mode_is_refused(tmp_path):
    result = _session("everything", out=tmp_path)
    assert result.returncode == 2
    assert "unknown mode 'everything' (tests|kernels|decode|offline|all)" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible: the script would run the GPU session")
def test_without_a_gpu_it_stops_before_any_step(tmp_path):
    result = _session("tests", out=tmp_path)
    assert result.returncode == 1
    assert "no CUDA device is visible" in result.stderr
    assert list(tmp_path.iterdir()) == []         # no step ran, no log written
