"""calib tests: the accuracy reference's at-conversion replay (a second CPU load of every written
checkpoint, ~0.4 s on the tiny models, seconds on SmolLM2) is left out here; tests/eval/ covers it
for every writer."""
from __future__ import annotations

import pytest

import calib.accuracy_reference


@pytest.fixture(autouse=True)
def _no_accuracy_replay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calib.accuracy_reference, "measure_at_conversion", lambda *args, **kwargs: None)
