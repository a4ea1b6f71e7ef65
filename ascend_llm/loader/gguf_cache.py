"""On-disk cache of GGUF -> HF conversions, keyed by file path, size and mtime, written atomically."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from ascend_llm.loader import gguf_convert

logger = logging.getLogger(__name__)

CACHE_ENV = "ASCEND_LLM_CACHE"
# Bump when the converter's output changes so stale caches are not reused.
CONVERTER_VERSION = "1"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")
_STALE_TEMP_SECONDS = 3600.0


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Cache root: ``cache_dir``, else ``$ASCEND_LLM_CACHE``, else ``~/.cache/ascend_llm``."""
    chosen = cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ascend_llm"
    return Path(chosen).expanduser()


def cache_key(gguf_path: Path) -> str:
    """A short hash of the resolved path, size, mtime and converter version of ``gguf_path``."""
    stat = gguf_path.stat()
    ident = f"{gguf_path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0v{CONVERTER_VERSION}"
    return hashlib.sha256(ident.encode("utf-8")).hexdigest()[:16]


def cached_dir_for(gguf_path: Path, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the conversion of ``gguf_path`` lives (whether or not it exists yet)."""
    return cache_root(cache_dir) / "gguf" / f"{gguf_path.stem}-{cache_key(gguf_path)}"


def _is_complete(directory: Path) -> bool:
    """True if ``directory`` holds a finished conversion."""
    return all((directory / name).is_file() for name in _REQUIRED_FILES)


def _remove_stale_temps(parent: Path, final_name: str) -> None:
    """Delete temp dirs left by conversions of the same file that were killed long ago."""
    cutoff = time.time() - _STALE_TEMP_SECONDS
    for temp in parent.glob(f".{final_name}.*.tmp"):
        if temp.is_dir() and temp.stat().st_mtime < cutoff:
            logger.info("removing stale partial conversion %s", temp)
            shutil.rmtree(temp, ignore_errors=True)


def _make_parent(parent: Path) -> None:
    """Create the cache folder, with a ValueError naming it if that is impossible."""
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create the model cache directory {str(parent)!r}: {exc}; "
                         f"pass cache_dir or set {CACHE_ENV} to a writable folder") from exc


def _convert_atomically(gguf_path: Path, final: Path) -> None:
    """Convert into a temp dir beside ``final`` and rename it into place in one step."""
    _make_parent(final.parent)
    _remove_stale_temps(final.parent, final.name)
    temp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        gguf_convert.convert_gguf_to_hf(gguf_path, temp)
        temp.chmod(0o755)  # mkdtemp creates it owner-only
        if final.exists() and not _is_complete(final):
            shutil.rmtree(final)
        os.rename(temp, final)
        logger.info("conversion of %s cached at %s", gguf_path, final)
    except OSError:
        if not _is_complete(final):  # not a lost race with another process: a real failure
            raise
        logger.info("another process finished converting %s first; using its result", gguf_path)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def cached_gguf_conversion(gguf_path: str | os.PathLike[str],
                           cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return an HF directory converted from ``gguf_path``, converting only on a cache miss."""
    source = Path(gguf_path).expanduser()
    final = cached_dir_for(source, cache_dir)
    if _is_complete(final):
        logger.info("reusing cached conversion of %s at %s", source, final)
        return final
    logger.info("converting %s to safetensors in %s (one-time)", source, final)
    try:
        _convert_atomically(source, final)
    except OSError as exc:
        raise ValueError(f"could not write the conversion of {str(source)!r} to {str(final)!r}: {exc}") from exc
    return final
