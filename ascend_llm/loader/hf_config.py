"""Loading an HF directory's config and tokenizer, with failures reported as clear ValueErrors."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import transformers
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase
from transformers.models.auto import CONFIG_MAPPING

from ascend_llm.loader.resolve import resolve_model_path

logger = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _read_config_json(config_path: Path) -> dict:
    """Parse config.json, naming the file and the problem when it is missing or malformed."""
    if not config_path.is_file():
        raise ValueError(f"model directory {str(config_path.parent)!r} has no config.json")
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{str(config_path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{str(config_path)!r} must hold a JSON object, got {type(data).__name__}")
    if "model_type" not in data:
        raise ValueError(f"{str(config_path)!r} has no 'model_type' field")
    if data["model_type"] not in CONFIG_MAPPING:
        raise ValueError(f"{str(config_path)!r} has model_type {data['model_type']!r}, which transformers "
                         f"{transformers.__version__} does not know")
    return data


def load_hf_config(model_dir: str | Path) -> PretrainedConfig:
    """Load ``model_dir/config.json`` with ``AutoConfig`` (local files only, no remote code).

    Raises ValueError naming the file for a missing or malformed config.json and for a
    ``model_type`` transformers does not know.
    """
    config_path = Path(model_dir) / "config.json"
    data = _read_config_json(config_path)
    try:
        config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # library boundary: transformers raises ValueError/KeyError/OSError/...
        raise ValueError(f"{str(config_path)!r} (model_type {data['model_type']!r}) could not be loaded "
                         f"by transformers: {exc}") from exc
    logger.debug("loaded %s from %s", type(config).__name__, config_path)
    return config


def _tokenizer_dir(model_dir: str | Path, tokenizer: str | None, cache_dir: str | None) -> Path:
    """The local directory holding tokenizer files: ``tokenizer`` if given, else ``model_dir``."""
    if tokenizer is None:
        return Path(model_dir)
    candidate = Path(tokenizer).expanduser()
    if candidate.is_dir():
        return candidate
    return resolve_model_path(tokenizer, cache_dir)


def load_tokenizer(model_dir: str | Path, tokenizer: str | None = None,
                   cache_dir: str | None = None) -> PreTrainedTokenizerBase:
    """Load the tokenizer of ``model_dir`` (or of ``tokenizer``: a local dir, .gguf or alias).

    Uses ``AutoTokenizer`` with local files only. Raises ValueError naming the directory when it
    has no tokenizer files or transformers cannot build a tokenizer from them.
    """
    directory = _tokenizer_dir(model_dir, tokenizer, cache_dir)
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        raise ValueError(f"tokenizer directory {str(directory)!r} has none of {list(_TOKENIZER_FILES)}")
    try:
        loaded = AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # library boundary
        raise ValueError(f"could not load a tokenizer from {str(directory)!r}: {exc}") from exc
    if not isinstance(loaded, PreTrainedTokenizerBase):
        raise ValueError(f"tokenizer files in {str(directory)!r} produced {type(loaded).__name__}, not a tokenizer")
    return loaded
