"""Strict checks of the JSON objects in quantization configs: a field we do not know is an error
naming it, never ignored."""
from __future__ import annotations

from typing import Any


def check_object(value: Any, known: set[str] | frozenset[str], where: str) -> dict:
    """`value` when it is a dict whose keys are all in `known`; ValueError naming `where` otherwise."""
    if not isinstance(value, dict):
        raise ValueError(f"{where}: must be an object, got {type(value).__name__}")
    check_known_fields(value, known, where)
    return value


def check_known_fields(value: dict, known: set[str] | frozenset[str], where: str) -> None:
    """ValueError naming the first key of `value` not in `known`, and the known ones."""
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(sorted(known))})")
