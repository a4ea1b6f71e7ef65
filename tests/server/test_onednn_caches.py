"""`ascend-llm serve` caps oneDNN's per-shape caches before the model loads (bounded RSS under a
server's ever-changing batch row counts); a user's own setting wins."""
from __future__ import annotations

import pytest

from ascend_llm.platform import ONEDNN_CACHE_ENV_VARS, SERVER_ONEDNN_CACHE_CAPACITY, bound_onednn_caches
from ascend_llm.server import api_server
from ascend_llm.server.args import make_parser


class _Stop(ValueError):
    """Raised by the stand-in engine factory: run_server stops before loading anything."""


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ONEDNN_CACHE_ENV_VARS:
        monkeypatch.setenv(name, "")          # restored (unset) after the test
        monkeypatch.delenv(name)
    return monkeypatch


def test_serve_caps_onednn_caches_before_the_engine_is_built(clean_env: pytest.MonkeyPatch) -> None:
    import os
    seen: dict[str, str | None] = {}

    def factory(*args: object, **kwargs: object) -> None:
        seen.update({name: os.environ.get(name) for name in ONEDNN_CACHE_ENV_VARS})
        raise _Stop("stop before loading")

    clean_env.setattr(api_server.AsyncLLMEngine, "from_engine_args", factory)
    with pytest.raises(_Stop):
        api_server.run_server(make_parser().parse_args([]))
    assert seen == {name: str(SERVER_ONEDNN_CACHE_CAPACITY) for name in ONEDNN_CACHE_ENV_VARS}


def test_user_setting_wins() -> None:
    environ = {"LRU_CACHE_CAPACITY": "2048", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": " "}
    assert bound_onednn_caches(64, environ) == {"LRU_CACHE_CAPACITY": "2048",
                                                "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64"}
