"""Turning a model argument (alias, .gguf file or HF directory) into a local HF-style directory."""
from __future__ import annotations

import logging
import re
from pathlib import Path

from ascend_llm.loader.bundled import BUNDLED_MODELS, bundled_gguf_path, find_bundled
from ascend_llm.loader.gguf_cache import cached_gguf_conversion

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
KNOWN_ALIASES: tuple[str, ...] = tuple(model.alias for model in BUNDLED_MODELS)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _not_found(model: str) -> ValueError:
    """The error for a model that is neither on disk nor a known alias."""
    hint = ""
    if _HUB_ID.match(model):
        hint = (" It looks like a Hugging Face hub id: download it yourself and pass the local directory"
                " (containing config.json and *.safetensors) or a .gguf file.")
    return ValueError(
        f"model {model!r} was not found locally. Models must be local paths (an HF-style directory with "
        f"config.json, or a .gguf file); hub downloads are not supported.{hint} "
        f"Known aliases: {', '.join(KNOWN_ALIASES)}.")


def _resolve_directory(directory: Path) -> Path:
    """An existing directory is used as is, provided it has a config.json."""
    if not (directory / "config.json").is_file():
        raise ValueError(f"model directory {str(directory)!r} has no config.json; expected an HF-style "
                         "directory (config.json + *.safetensors + tokenizer files)")
    return directory


def _resolve_file(path: Path, cache_dir: str | None) -> Path:
    """A .gguf file is converted (once) into a cached HF directory; other files are rejected."""
    if path.suffix.lower() != ".gguf":
        raise ValueError(f"model path {str(path)!r} is a file but not a .gguf; pass an HF-style directory "
                         "(with config.json) or a .gguf file")
    return cached_gguf_conversion(path, cache_dir)


def resolve_model_path(model: str, cache_dir: str | None = None) -> Path:
    """Resolve ``model`` to a local HF-style directory (config.json + *.safetensors + tokenizer files).

    ``model`` may be an existing directory (returned as is; must contain config.json), a ``.gguf``
    file (converted once into a cache under ``cache_dir``, else ``$ASCEND_LLM_CACHE``, else
    ``~/.cache/ascend_llm``), or a known alias such as ``smollm2-135m-instruct`` (case-insensitive;
    hub-style ``HuggingFaceTB/SmolLM2-135M-Instruct`` is accepted too), which maps to a GGUF shipped
    in a pip package. Existing paths win over aliases. Anything else raises ValueError: nothing is
    ever downloaded.
    """
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"model must be a non-empty path or alias, got {model!r}")
    path = Path(model).expanduser()
    if path.is_dir():
        return _resolve_directory(path)
    if path.is_file():
        return _resolve_file(path, cache_dir)
    bundled = find_bundled(model)
    if bundled is not None:
        gguf_path = bundled_gguf_path(bundled)
        logger.info("model alias %r -> %s", model, gguf_path)
        return cached_gguf_conversion(gguf_path, cache_dir)
    raise _not_found(model)
