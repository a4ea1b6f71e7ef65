"""Interleave two calibration files into one stream, keeping the second file's last texts last.

    python -m calib.mix --first gen.jsonl --second calib_prose.jsonl \
        --ratio 0.9 --keep_tail 24 --output mix.jsonl

Calibration tools read the first rows of their stream for calibration and, with held-out rows,
the last ones for validation (calib/wint2/calibration.split_calibration_ids). A mix of synthetic texts
(calib/synthetic.py) with real ones should give calibration rows from both and keep the
held-out rows real: after the i-th text of --first (0-based), texts of --second are added until
ceil((i + 1) * ratio) of them are in (exact fractions, so ratio 0.9 adds one after each text of
--first but every tenth); the last --keep_tail texts of --second are held back and written at the
very end, after whatever else is left. Every input text appears exactly once, unchanged.
An existing --output is refused without --overwrite; the file is written beside the target under
a temporary name and renamed at the end (calib/output_dir.write_jsonl), never left half-written.
"""
from __future__ import annotations

import argparse
import math
from fractions import Fraction

from calib.output_dir import check_output_file, write_jsonl
from calib.texts import read_calib_texts


def interleave_texts(first: list[str], second: list[str], ratio: float, keep_tail: int) -> list[str]:
    """first and second mixed as the module doc says."""
    if not (math.isfinite(ratio) and ratio >= 0):
        raise ValueError(f"--ratio must be a number >= 0, got {ratio}")
    if not 0 <= keep_tail <= len(second):
        raise ValueError(f"--keep_tail must be between 0 and the {len(second)} texts of --second, got {keep_tail}")
    head, tail = second[:len(second) - keep_tail], second[len(second) - keep_tail:]
    step = Fraction(ratio).limit_denominator(1000)
    mixed: list[str] = []
    used = 0
    for i, text in enumerate(first):
        mixed.append(text)
        want = min(math.ceil((i + 1) * step), len(head))
        mixed.extend(head[used:want])
        used = max(used, want)
    return mixed + head[used:] + tail


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m calib.mix",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--first", required=True, help="JSON lines (key text / prompt), e.g. synthetic texts")
    parser.add_argument("--second", required=True, help="JSON lines whose last --keep_tail texts end the output")
    parser.add_argument("--ratio", type=float, default=1.0, help="texts of --second per text of --first")
    parser.add_argument("--keep_tail", type=int, default=0)
    parser.add_argument("--output", required=True, help="JSON lines file to write (key text)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    args = parser.parse_args(argv)
    try:                                       # CalibError is a ValueError: one line, exit 2
        texts = interleave_texts(read_calib_texts(args.first), read_calib_texts(args.second), args.ratio,
                                 args.keep_tail)
        output = check_output_file(args.output, args.overwrite)
        write_jsonl(output, ({"text": text} for text in texts))
    except (ValueError, OSError) as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    main()
