"""Calibration data: JSON lines with one text per line (msModelSlim boolq.jsonl style)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from calib.config import CalibError

TEXT_KEYS = ("inputs_pretokenized", "text", "prompt")


def load_calib_texts(path: str | Path, num_samples: int | None = None) -> list[str]:
    """The first `num_samples` texts of a JSONL file (key inputs_pretokenized, text or prompt).

    Blank lines are skipped; a malformed line, a line without a known key or a file with no
    texts raises CalibError naming the file and line number.
    """
    path = Path(path)
    if not path.is_file():
        raise CalibError(f"--calib_file: {str(path)!r} does not exist")
    texts: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            texts.append(_text_of(_parse_line(line, path, number), path, number))
            if num_samples is not None and len(texts) >= num_samples:
                break
    if not texts:
        raise CalibError(f"--calib_file: {str(path)!r} holds no calibration texts (empty file)")
    return texts


def _parse_line(line: str, path: Path, number: int) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise CalibError(f"{path}:{number}: malformed JSON line: {exc.msg}") from exc


def _text_of(record: Any, path: Path, number: int) -> str:
    if not isinstance(record, dict):
        raise CalibError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
    for key in TEXT_KEYS:
        value = record.get(key)
        if isinstance(value, str) and value.strip():
            return value
    raise CalibError(f"{path}:{number}: no non-empty text under any known key "
                     f"({', '.join(TEXT_KEYS)}); keys present: {sorted(record)}")


def tokenize_texts(tokenizer: Any, texts: list[str], max_tokens: int) -> list[torch.Tensor]:
    """Each text -> input_ids [1, <= max_tokens] (texts that tokenize to nothing are dropped)."""
    batches = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_tokens)["input_ids"]
        if ids:
            batches.append(torch.tensor([ids], dtype=torch.long))      # [1, seq]
    if not batches:
        raise CalibError("calibration texts produced no tokens")
    return batches
