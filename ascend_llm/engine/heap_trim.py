"""When the engine thread hands freed heap back to the OS.

glibc keeps freed heap pages resident for reuse. A server's steps allocate tensors of ever-changing
shapes from several threads, so that freed-but-resident heap grew by ~100 MiB per 100 requests
in a 24-way soak, without bound. `malloc_trim(0)` (`platform.release_free_heap`) releases it.
It runs on the engine thread between steps:
- once when the engine goes idle after doing work;
- at most every `interval_s` under constant load (a server at high concurrency is never idle).
"""
from __future__ import annotations

import time
from collections.abc import Callable

from ascend_llm.platform import release_free_heap

DEFAULT_TRIM_INTERVAL_S = 30.0


class HeapTrimmer:
    """Decides, between engine steps, whether to release freed heap now (and does it)."""

    def __init__(self, interval_s: float = DEFAULT_TRIM_INTERVAL_S,
                 trim: Callable[[], None] = release_free_heap,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._trim, self._clock = trim, clock
        self._last = clock()
        self._worked_since_trim = False
        self.trims = 0

    def after_step(self) -> None:
        """A step ran: trim if the last trim is `interval_s` old."""
        self._worked_since_trim = True
        if self._clock() - self._last >= self.interval_s:
            self._run()

    def on_idle(self) -> None:
        """No request is left: trim once if any step ran since the last trim."""
        if self._worked_since_trim:
            self._run()

    def _run(self) -> None:
        self._trim()
        self.trims += 1
        self._last = self._clock()
        self._worked_since_trim = False
