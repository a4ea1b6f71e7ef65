"""HeapTrimmer: freed heap goes back to the OS once when the engine goes idle after work, and at
most every interval under constant load (the serving engine thread: tests/server/test_heap_trim.py)."""
from __future__ import annotations

from ascend_llm.engine.heap_trim import HeapTrimmer


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _trimmer(interval: float = 30.0) -> tuple[HeapTrimmer, list[float], _Clock]:
    clock, calls = _Clock(), []
    return HeapTrimmer(interval, trim=lambda: calls.append(clock.now), clock=clock), calls, clock


def test_idle_trims_once_after_work_and_never_when_nothing_ran():
    trimmer, calls, clock = _trimmer()
    for _ in range(3):
        trimmer.on_idle()
    assert calls == []                          # an idle server that did nothing never trims
    trimmer.after_step()
    clock.now = 1.0
    trimmer.on_idle()
    trimmer.on_idle()
    assert calls == [1.0]


def test_constant_load_trims_every_interval():
    trimmer, calls, clock = _trimmer(interval=30.0)
    for step in range(1, 200):                  # 199 steps, 0.5 s apart, never idle
        clock.now = step * 0.5
        trimmer.after_step()
    assert calls == [30.0, 60.0, 90.0]
    assert trimmer.trims == 3
