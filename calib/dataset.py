"""Calibration data: JSON lines with one text per line (msModelSlim boolq.jsonl style)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from calib.config import CalibError
from calib.texts import read_calib_texts



def load_calib_texts(path: str | Path, num_samples: int | None = None) -> list[str]:
    """The first `num_samples` texts of a JSONL file (calib/texts.py); a bad
    file raises CalibError naming the file and line number."""
    try:
        return read_calib_texts(path, num_samples)
    except CalibError:
        raise
    except ValueError as exc:
        raise CalibError(str(exc)) from exc


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
