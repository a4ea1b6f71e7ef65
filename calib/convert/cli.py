"""`python -m calib.convert --from FORMAT --to FORMAT SRC DST` (also `ascend-llm convert ...`).

Exit codes: 0 done, 2 bad options or inputs (one error line, no traceback).
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from calib.accuracy_reference import carry_over
from calib.config import CalibError
from calib.convert.neutral import NeutralCheckpoint
from calib.convert.read_ascendv1 import read_ascendv1
from calib.convert.read_autofp8 import read_autofp8
from calib.convert.read_compressed_tensors import read_compressed_tensors
from calib.convert.read_fastdeploy import read_fastdeploy
from calib.convert.write_ascendv1 import (ASCEND_CHANGES, description_group_size, static_bias_rounding,
                                         vllm_ascend_gap, write_ascendv1)
from calib.convert.transform_config import VLLM_NOTE
from calib.convert.write_compressed_tensors import write_compressed_tensors
from calib.export import copy_side_files
from calib.output_dir import check_output_dir, staged_output
from calib.report import ToolReport

logger = logging.getLogger(__name__)

READERS: dict[str, Callable[[Path], NeutralCheckpoint]] = {
    "compressed-tensors": read_compressed_tensors, "ascendv1": read_ascendv1,
    "fastdeploy": read_fastdeploy, "autofp8": read_autofp8}
WRITERS: dict[str, Callable[[NeutralCheckpoint, Path], dict[str, str]]] = {
    "ascendv1": write_ascendv1, "compressed-tensors": write_compressed_tensors}
NOT_COPIED = ("MANIFEST.json", "calib_report.json", "convert_report.json")
REPORT_FILE = "convert_report.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m calib.convert",
                                description="Re-write a quantized checkpoint for another runtime: "
                                            "compressed-tensors (vLLM) <-> ascendV1 (vllm-ascend, MindIE); "
                                            "FastDeploy wint8 / wint4 and AutoFP8 sources too.")
    p.add_argument("--from", dest="source_format", required=True, choices=sorted(READERS))
    p.add_argument("--to", dest="target_format", required=True, choices=sorted(WRITERS))
    p.add_argument("src", help="source checkpoint directory")
    p.add_argument("dst", help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace the content of a non-empty DST")
    return p


def convert(source_format: str, target_format: str, src: str | Path, dst: str | Path,
            overwrite: bool = False) -> ToolReport:
    """Read `src` as `source_format`, write `dst` as `target_format`; the report is also written."""
    if source_format == target_format:
        raise CalibError(f"--from and --to are both {source_format!r}; nothing to convert")
    src_dir = Path(src).expanduser().resolve()
    if not src_dir.is_dir():
        raise CalibError(f"SRC: {str(src_dir)!r} is not a directory")
    target = check_output_dir(dst, overwrite)
    report = ToolReport("calib.convert", str(src_dir), str(target),
                        {"from": source_format, "to": target_format, "overwrite": overwrite})
    with report.stage("read"):
        checkpoint = READERS[source_format](src_dir)
    if not checkpoint.linears:
        raise CalibError(f"{src_dir}: no quantized Linear found; nothing to convert")
    with staged_output(target) as staging:
        with report.stage("write"):
            _copy_side_files(src_dir, staging)
            written = WRITERS[target_format](checkpoint, staging)
        report.summary = _summary(checkpoint, written, target_format)
        with report.stage("accuracy_reference"):
            report.summary["accuracy_reference"] = carry_over(src_dir, staging, "calib.convert")
        report.write_json(staging, REPORT_FILE)
    return report


def _copy_side_files(src: Path, staging: Path) -> None:
    copy_side_files(src, staging)
    for name in NOT_COPIED:
        (staging / name).unlink(missing_ok=True)
    shutil.rmtree(staging / "reference", ignore_errors=True)


def _summary(checkpoint: NeutralCheckpoint, written: dict[str, str], target_format: str) -> dict:
    layers = {}
    gaps: dict[str, str] = {}
    group = description_group_size(checkpoint) if target_format == "ascendv1" else 0
    for module, linear in sorted(checkpoint.linears.items()):
        gap = vllm_ascend_gap(linear, group) if target_format == "ascendv1" else None
        if gap:
            gaps.setdefault(gap, module)
        note = checkpoint.notes.get(module)
        if target_format == "ascendv1":
            note = ASCEND_CHANGES.get(linear.scheme, note)
        rounding = static_bias_rounding(linear) if target_format == "ascendv1" else 0.0
        if rounding:
            note = f"float bias folded into quant_bias: max change {rounding:.3g}"
        layers[module] = {"scheme": linear.scheme, "written": written[module], "lossless": note is None,
                          **({"note": note} if note else {})}
    summary = {"layers": layers, "lossless": all(entry["lossless"] for entry in layers.values()),
               "float_tensors": len(checkpoint.floats)}
    if checkpoint.online_hadamard:      # carried as ascendV1 online_hadamard / compressed-tensors transform_config
        summary["online_hadamard"] = dict(checkpoint.online_hadamard)
        if target_format == "compressed-tensors":
            summary["online_hadamard"]["vllm"] = VLLM_NOTE
    if gaps:
        summary["not_loaded_by_vllm_ascend"] = sorted(gaps)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        report = convert(args.source_format, args.target_format, args.src, args.dst, args.overwrite)
    except (CalibError, ValueError, OSError) as exc:
        print(f"python -m calib.convert: error: {exc}", file=sys.stderr)
        return 2
    for gap in report.summary.get("not_loaded_by_vllm_ascend", []):
        logger.warning("%s", gap)
    changed = [m for m, entry in report.summary["layers"].items() if not entry["lossless"]]
    logger.info("converted %d Linear(s) %s -> %s into %s; %s", len(report.summary["layers"]),
                args.source_format, args.target_format, report.save_directory,
                "lossless" if not changed else f"{len(changed)} changed (see {REPORT_FILE})")
    return 0
