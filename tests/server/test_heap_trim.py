"""The serving engine thread releases freed heap (HeapTrimmer) once it goes idle after work."""
from __future__ import annotations

import time

from ascend_llm.engine.heap_trim import HeapTrimmer


def test_the_serving_engine_trims_when_it_goes_idle(engine, client):
    calls: list[float] = []
    original = engine.heap_trimmer
    engine.heap_trimmer = HeapTrimmer(3600.0, trim=lambda: calls.append(time.monotonic()))
    try:
        response = client.post("/v1/completions", json={"prompt": "The quick", "max_tokens": 4,
                                                         "temperature": 0.0})
        assert response.status_code == 200
        deadline = time.monotonic() + 10
        while not calls and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(calls) == 1 and engine.heap_trimmer.trims == 1
    finally:
        engine.heap_trimmer = original
