"""After a shutdown signal the server process ends within a bound, whatever blocks it.

The drain itself is bounded (--shutdown-timeout, the engine's join, the tensor-parallel stop), but
a process can still hang after it: a C++ destructor of a torch.distributed group run by the garbage
collector at interpreter exit, a thread pool that atexit joins, a collective waiting on a peer. A
Python timer cannot help there (no Python thread runs once the interpreter finalizes), so the
deadline is faulthandler's C watchdog: when it passes, the stacks of every thread go to stderr
(headed "Timeout (h:mm:ss)!") and the process exits with code 1.
"""
from __future__ import annotations

import faulthandler
import io
import logging
import sys

logger = logging.getLogger(__name__)

EXIT_MARGIN_S = 20.0    # past the drain: the engine join, the tensor-parallel stop (10 s) and its kill


def arm_exit_deadline(seconds: float) -> bool:
    """End this process with code 1 (stacks on stderr) if it is still running `seconds` from now;
    False when stderr has no file descriptor to dump to (then nothing is armed)."""
    stream = sys.stderr if _has_fileno(sys.stderr) else sys.__stderr__
    if not _has_fileno(stream):
        logger.warning("shutdown: no stderr file descriptor; the %.0f s exit deadline is not armed", seconds)
        return False
    faulthandler.dump_traceback_later(seconds, exit=True, file=stream)
    logger.info("shutdown: the process exits within %.0f s (past that its thread stacks go to stderr and it "
                "exits with code 1)", seconds)
    return True


def _has_fileno(stream: object) -> bool:
    try:
        stream.fileno()            # type: ignore[union-attr]
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return False
    return True
