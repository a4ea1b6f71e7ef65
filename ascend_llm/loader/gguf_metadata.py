"""Reading a GGUF file's header: opening it safely and pulling typed metadata values."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import gguf

logger = logging.getLogger(__name__)

_MISSING = object()


def open_gguf(gguf_path: str | Path) -> gguf.GGUFReader:
    """Open a GGUF file (memory-mapped), turning any parse failure into a ValueError naming the file."""
    path = Path(gguf_path)
    if not path.is_file():
        raise ValueError(f"GGUF file {str(path)!r} does not exist or is not a file")
    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # library boundary: gguf raises assorted errors on bad files
        raise ValueError(f"GGUF file {str(path)!r} could not be read ({type(exc).__name__}: {exc}); "
                         "is it a complete, valid .gguf file?") from exc


def gguf_value(reader: gguf.GGUFReader, key: str, default: Any = _MISSING) -> Any:
    """Return metadata ``key`` as a Python value (int, float, str, list); ``default`` if absent.

    Raises ValueError naming the key when it is missing and no default was given.
    """
    field = reader.get_field(key)
    if field is None:
        if default is _MISSING:
            raise ValueError(f"GGUF metadata has no {key!r} entry")
        return default
    try:
        return field.contents()
    except Exception as exc:  # library boundary: malformed field
        raise ValueError(f"GGUF metadata entry {key!r} could not be decoded: {exc}") from exc


def gguf_architecture(reader: gguf.GGUFReader) -> str:
    """The ``general.architecture`` of the file (e.g. ``"llama"``)."""
    arch = gguf_value(reader, "general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ValueError(f"GGUF metadata 'general.architecture' is not a string: {arch!r}")
    return arch


def gguf_tensor_names(reader: gguf.GGUFReader) -> set[str]:
    """Names of every tensor stored in the file."""
    return {tensor.name for tensor in reader.tensors}
