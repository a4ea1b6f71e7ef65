"""Streaming tensors out of an HF directory's safetensors files (single, sharded or loose)."""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_READ_ERRORS = (SafetensorError, OSError, RuntimeError, ValueError)


def _read_index(index_path: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file name) of a sharded checkpoint's index."""
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"safetensors index {str(index_path)!r} is unreadable or has no weight_map: {exc}") from exc
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"safetensors index {str(index_path)!r} has an empty or invalid weight_map")
    return weight_map


def _sharded_plan(directory: Path) -> list[tuple[Path, list[str] | None]]:
    """(shard, tensor names from the index) pairs, checking every shard exists."""
    weight_map = _read_index(directory / INDEX_FILE)
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    plan = []
    for shard in sorted(by_shard):
        path = directory / shard
        if not path.is_file():
            raise ValueError(f"shard {str(path)!r} listed in {INDEX_FILE} does not exist")
        plan.append((path, sorted(by_shard[shard])))
    return plan


def _weight_files(directory: Path) -> list[tuple[Path, list[str] | None]]:
    """Which files to read (and, for sharded checkpoints, which names each must contain)."""
    if not directory.is_dir():
        raise ValueError(f"model directory {str(directory)!r} does not exist")
    if (directory / INDEX_FILE).is_file():
        return _sharded_plan(directory)
    if (directory / SINGLE_FILE).is_file():
        return [(directory / SINGLE_FILE, None)]
    files = sorted(p for p in directory.glob("*.safetensors") if p.is_file())
    if not files:
        raise ValueError(f"model directory {str(directory)!r} has no *.safetensors weights")
    return [(path, None) for path in files]


def _corrupt(path: Path, exc: BaseException) -> ValueError:
    """The error for a safetensors file the library cannot read."""
    return ValueError(f"safetensors file {str(path)!r} is corrupt or unreadable: {exc}")


def _open(path: Path):  # noqa: ANN202 - safetensors' handle type is not public
    """Open ``path`` with safetensors, turning its errors into ValueError naming the file."""
    try:
        return safe_open(str(path), framework="pt")
    except _READ_ERRORS as exc:
        raise _corrupt(path, exc) from exc


def _iter_file(path: Path, names: list[str] | None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the tensors of one safetensors file (only ``names``, in that order, when given).

    The file is re-opened for every tensor: safetensors maps the file, and pages of a mapping
    count as resident memory until it is closed, so one long-lived handle would hold the whole
    checkpoint resident next to the model's own copy (doubling peak memory while loading).
    """
    with _open(path) as handle:
        available = set(handle.keys())
    missing = sorted(set(names or ()) - available)
    if missing:
        raise ValueError(f"safetensors file {str(path)!r} lacks tensors its index lists: {missing[:5]}")
    for name in names or sorted(available):
        with _open(path) as handle:
            try:
                tensor = handle.get_tensor(name)
            except _READ_ERRORS as exc:
                raise _corrupt(path, exc) from exc
        yield name, tensor
        del tensor


def iter_safetensors_weights(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every weight in ``model_dir``, one tensor at a time.

    Reads ``model.safetensors.index.json`` + its shards when present, else ``model.safetensors``,
    else every ``*.safetensors`` file. Tensors keep their stored dtype and live on CPU. Raises
    ValueError (immediately) when the directory holds no safetensors, and (while iterating) when a
    file is corrupt or truncated, naming the file.
    """
    plan = _weight_files(Path(model_dir))
    logger.debug("reading weights from %d safetensors file(s) in %s", len(plan), model_dir)
    return _iter_plan(plan)


def _iter_plan(plan: list[tuple[Path, list[str] | None]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Chain the per-file iterators."""
    for path, names in plan:
        yield from _iter_file(path, names)
