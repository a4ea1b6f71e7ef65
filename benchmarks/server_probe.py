"""What the server benchmarks read off a server subprocess: its memory, and when it is healthy."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of `pid` in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def wait_healthy(base: str, proc: subprocess.Popen, timeout: float) -> None:
    """Poll `base`/health until 200; RuntimeError if the server exits, TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before becoming healthy")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError("server did not become healthy in time")
