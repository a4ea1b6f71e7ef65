"""Streaming float32 safetensors writer: header first, then one tensor at a time (low peak memory)."""
from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

_ALIGN = 8
_F32_BYTES = 4


def _header_bytes(shapes: Sequence[tuple[str, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    """The JSON header (space-padded to 8 bytes) describing contiguous float32 tensors in order."""
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, shape in shapes:
        size = math.prod(shape) * _F32_BYTES
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return raw + b" " * (-len(raw) % _ALIGN)


def write_f32_safetensors(path: str | Path, shapes: Sequence[tuple[str, tuple[int, ...]]],
                          tensors: Iterable[tuple[str, np.ndarray]],
                          metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (yielded in exactly the order and shapes of ``shapes``) to ``path``.

    Only one tensor is held in memory at a time. Raises ValueError if the stream disagrees with
    ``shapes`` (wrong name, shape, or count).
    """
    header = _header_bytes(shapes, metadata or {"format": "pt"})
    expected = iter(shapes)
    written = 0
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(header)))
        out.write(header)
        for name, array in tensors:
            want = next(expected, None)
            if want is None or want[0] != name or tuple(array.shape) != tuple(want[1]):
                raise ValueError(f"safetensors stream mismatch: got {name!r} {tuple(array.shape)}, expected {want}")
            out.write(np.ascontiguousarray(array, dtype="<f4").data)
            written += 1
    if written != len(shapes):
        raise ValueError(f"safetensors stream ended after {written} of {len(shapes)} tensors")
