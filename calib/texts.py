"""Calibration texts: JSON lines with one text per line (msModelSlim boolq.jsonl style).

Shared by every calibrating writer (calib/, calib/wint2/writer.py, calib/wint2/tune.py).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TEXT_KEYS = ("inputs_pretokenized", "text", "prompt")


def read_calib_texts(path: str | Path, num_samples: int | None = None) -> list[str]:
    """The first `num_samples` texts (all if None) of a JSONL file (key inputs_pretokenized,
    text or prompt). Blank lines are skipped; a missing file, a malformed line, a line without
    a known key or a file with no texts raises ValueError naming the file and line number."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--calib_file: {str(path)!r} does not exist")
    texts: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            texts.append(_text_of(_parse_line(line, path, number), path, number))
            if num_samples is not None and len(texts) >= num_samples:
                break
    if not texts:
        raise ValueError(f"--calib_file: {str(path)!r} holds no calibration texts (empty file)")
    return texts


def _parse_line(line: str, path: Path, number: int) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{number}: malformed JSON line: {exc.msg}") from exc


def _text_of(record: Any, path: Path, number: int) -> str:
    if not isinstance(record, dict):
        raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
    for key in TEXT_KEYS:
        value = record.get(key)
        if isinstance(value, str) and value.strip():
            return value
    raise ValueError(f"{path}:{number}: no non-empty text under any known key "
                     f"({', '.join(TEXT_KEYS)}); keys present: {sorted(record)}")
