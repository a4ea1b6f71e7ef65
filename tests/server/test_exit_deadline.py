"""After a shutdown signal the server process ends within a bound even when something blocks its
exit: faulthandler's watchdog dumps every thread's stack to stderr and exits with code 1."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_HANGS = """
import logging, threading
from ascend_llm.server.exit_deadline import arm_exit_deadline
logging.basicConfig(level=logging.INFO)
assert arm_exit_deadline(1.0)
threading.Event().wait()       # a join that never returns
"""


def test_a_process_blocked_after_the_signal_exits_at_the_deadline_with_its_stacks():
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _HANGS], cwd=ROOT, capture_output=True, text=True, timeout=30,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert time.monotonic() - started < 15
    assert proc.returncode == 1
    assert "the process exits within 1 s" in proc.stderr
    assert "Timeout (0:00:01)!" in proc.stderr and "in <module>" in proc.stderr   # the blocked frame
