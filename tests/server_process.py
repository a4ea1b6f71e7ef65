"""Waiting for a server started as a subprocess (`python -m ascend_llm.server.api_server`)."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx


def wait_healthy(base: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Poll `base`/health until 200; AssertionError with the server log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("server did not become healthy:\n" + log.read_text())
