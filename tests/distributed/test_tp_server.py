"""The OpenAI server with `--tp 2` on a tiny model: answers a completion and an embedding; after its worker is
killed, /health turns 503 naming the rank, and the next request fails instead of hanging."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from ascend_llm.distributed.parallel_state import free_port
from tests.distributed.test_tp_engine import worker_pids
from tests.server.test_embeddings import hf_embeddings
from tests.server_process import wait_healthy

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_server_with_tp2_answers_and_reports_a_dead_worker(tiny_llama_dir, tmp_path):
    port = free_port()
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "ascend_llm.server.api_server", "--model", str(tiny_llama_dir),
           "--served-model-name", "tiny", "--max-model-len", "128", "--port", str(port), "--device", "cpu",
           "--kv-cache-memory-gb", "0.05", "--tp", "2", "--shutdown-timeout", "5"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, log, timeout=120)
        body = {"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 6, "temperature": 0,
                "ignore_eos": True}
        resp = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
        assert resp.status_code == 200, resp.text
        assert resp.json()["usage"]["completion_tokens"] == 6
        text = "The quick brown fox"     # embeddings come from the driver rank's all-reduced hidden states
        embedding = httpx.post(f"{base}/v1/embeddings", json={"input": text}, timeout=60).json()
        np.testing.assert_allclose(embedding["data"][0]["embedding"], hf_embeddings(tiny_llama_dir, [text])[text],
                                   atol=2e-3)
        (pid,) = worker_pids(proc.pid)
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        health = httpx.get(f"{base}/health", timeout=5)
        assert health.status_code == 503
        assert "tensor-parallel worker rank 1 exited with code -9" in health.text
        failed = httpx.post(f"{base}/v1/completions", json=body, timeout=30)
        assert failed.status_code >= 500 and "rank 1" in failed.text
        assert proc.wait(timeout=30) == 1           # the engine failed: the server exits non-zero
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        print(log.read_text(errors="replace")[-4000:])
