"""Paths of the project's shared real-text data (`shared/` sits beside the repository)."""
from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CALIB_PROSE = SHARED_DATA / "calib_prose.jsonl"
EVAL_TEMPEST = SHARED_DATA / "eval_tempest.txt"
EVAL_PARADISE = SHARED_DATA / "eval_paradise_regained.txt"
