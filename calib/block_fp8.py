"""Calibrated block-wise FP8 checkpoints (DeepSeek-V3 layout) with GPTQ rounding.

    python -m calib.block_fp8 --model_path M --save_directory OUT --calib_file data.jsonl \
        [--method gptq|rtn] [--weight_block_size 128 128] [--num_samples 32] [--max_tokens 512]

Every decoder Linear becomes `weight` float8_e4m3fn [n, k] plus `weight_scale_inv` float32
[ceil(n/bn), ceil(k/bk)] (the block's dequant multiplier, amax / 448 of the float block);
config.json gets `quantization_config = {quant_method: fp8, activation_scheme: dynamic,
weight_block_size: [bn, bk]}`, which this runtime (and vLLM / SGLang) load as block FP8 with
dynamic per-token-per-bk activations. Embeddings, norms and the LM head are copied unchanged.

`--method rtn` rounds each weight to the nearest e4m3 value (what online `block_wise_fp8`
does). `--method gptq` keeps the same block scales but rounds column by column, pushing each
column's error onto the columns not yet rounded through the inverse Hessian of the layer's
calibration inputs (calib/gptq.py), so the layer output, not the weight, stays close to float.

Output as in `python -m calib`: a non-empty `--save_directory` is refused without `--overwrite`,
the checkpoint is written into a temporary sibling and renamed at the end (calib/output_dir.py),
and `block_fp8_report.json` holds the tool, arguments, source model, times (calib/report.py
ToolReport) and the per-Linear output errors; bad inputs print one error line and exit with 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from ascend_llm.numerics import primitives as P
from calib.accuracy_reference import float_reference, heldout_texts, record_and_write
from calib.config import CalibError
from calib.dataset import load_calib_texts, tokenize_texts
from calib.export import _float_state, copy_side_files
from calib.finite import check_finite_weights
from calib.gptq import gptq_round, output_error
from calib.hessians import collect_hessians
from calib.model_spec import find_groups
from calib.output_dir import check_output_dir, staged_output
from calib.pipeline import load_model, resolve_device
from calib.report import ToolReport

logger = logging.getLogger(__name__)

METHODS = ("gptq", "rtn")
WEIGHTS_FILE = "model.safetensors"
REPORT_FILE = "block_fp8_report.json"


@dataclass
class BlockFp8Options:
    """What to convert and how; validated by `check`."""

    model_path: str
    save_directory: str
    calib_file: str | None = None
    method: str = "gptq"
    weight_block_size: tuple[int, int] = (128, 128)
    num_samples: int = 32
    max_tokens: int = 512
    device_type: str = "cpu"
    overwrite: bool = False
    progress: bool = True

    def check(self) -> None:
        if self.method not in METHODS:
            raise CalibError(f"--method: {self.method!r} is not one of {', '.join(METHODS)}")
        bn, bk = self.weight_block_size
        if bn <= 0 or bk <= 0:
            raise CalibError(f"--weight_block_size: must be two positive integers, got {bn} {bk}")
        if self.method == "gptq" and not self.calib_file:
            raise CalibError("--calib_file: GPTQ rounding needs calibration data (or use --method rtn)")
        if self.num_samples <= 0 or self.max_tokens <= 0:
            raise CalibError("--num_samples and --max_tokens must be positive")


@dataclass
class LayerError:
    """Relative output error on the calibration inputs of one Linear, RTN vs the written one."""

    name: str
    rtn: float
    written: float


@dataclass
class BlockFp8Report:
    """Per-Linear errors; written next to the checkpoint as JSON."""

    method: str
    weight_block_size: tuple[int, int]
    layers: list[LayerError] = field(default_factory=list)

    def mean(self, attr: str) -> float:
        values = [getattr(e, attr) for e in self.layers]
        return sum(values) / max(1, len(values))

    def to_json(self) -> dict:
        return {"method": self.method, "weight_block_size": list(self.weight_block_size),
                "mean_output_error_rtn": self.mean("rtn"),
                "mean_output_error_written": self.mean("written"),
                "layers": [vars(e) for e in self.layers]}


def quantize_block_fp8(weight: torch.Tensor, block_size: tuple[int, int],
                       hessian: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [n, k] -> (e4m3 [n, k], scale_inv float32 [NB, KB]); GPTQ rounding when a
    Hessian [k, k] is given, else round-to-nearest. Scales are the float blocks' amax / 448."""
    q, scale_inv = P.quantize_fp8_block(weight, block_size)
    if hessian is None:
        return q, scale_inv
    scales = P.expand_block_scale(scale_inv, tuple(weight.shape), block_size)    # [n, k]

    def round_columns(cols: torch.Tensor, first: int) -> torch.Tensor:   # cols [n, 1]
        scale = scales[:, first:first + 1]                               # [n, 1]
        return P.fp8_cast(cols / scale).float() * scale

    values = gptq_round(weight.float(), hessian, round_columns)          # [n, k] on the grid
    return P.fp8_cast(values / scales), scale_inv      # exact: each value is code * its scale


def convert(options: BlockFp8Options) -> BlockFp8Report:
    """Write the block-FP8 checkpoint of `options.model_path`; returns the per-layer errors."""
    options.check()
    target = check_output_dir(options.save_directory, options.overwrite)
    tool_report = ToolReport("calib.block_fp8", options.model_path, options.save_directory,
                             arguments=asdict(options))
    with tool_report.stage("load"):
        model, tokenizer, model_dir, source_dtype = load_model(options.model_path,
                                                               resolve_device(options.device_type))
        check_finite_weights(model, "in the checkpoint")
        reference = float_reference(model, tokenizer, heldout_texts(options.calib_file, options.num_samples),
                                    "calib.block_fp8", str(model_dir))
    groups = find_groups(model)
    hessians = {}
    if options.calib_file:
        with tool_report.stage("hessians"):
            texts = load_calib_texts(options.calib_file, options.num_samples)
            batches = tokenize_texts(tokenizer, texts, options.max_tokens)
            hessians = collect_hessians(model, groups, batches, options.progress)
    report = BlockFp8Report(options.method, options.weight_block_size)
    tensors = {name: t.to(source_dtype) for name, t in _float_state(model).items()}
    modules = dict(model.named_modules())
    with tool_report.stage("quantize"):
        for group in tqdm(groups, desc=f"block fp8 ({options.method})", disable=not options.progress):
            hessian = hessians.get(group.key)
            for name in group.names:
                weight = modules[name].weight.detach().float().cpu()                 # [n, k]
                q, scale_inv = quantize_block_fp8(weight, options.weight_block_size,
                                                  hessian if options.method == "gptq" else None)
                tensors[f"{name}.weight"] = q
                tensors[f"{name}.weight_scale_inv"] = scale_inv
                if hessian is not None:
                    report.layers.append(_layer_error(name, weight, q, scale_inv,
                                                      options.weight_block_size, hessian))
    tool_report.summary.update(report.to_json())
    with staged_output(target) as staging:
        with tool_report.stage("write"):
            save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
            copy_side_files(model_dir, staging)
            _write_quantization_config(staging / "config.json", options.weight_block_size)
        tool_report.write_json(staging, REPORT_FILE)
        with tool_report.stage("accuracy_reference"):
            record_and_write(reference, staging)
    return report


def _layer_error(name: str, weight: torch.Tensor, q: torch.Tensor, scale_inv: torch.Tensor,
                 block_size: tuple[int, int], hessian: torch.Tensor) -> LayerError:
    rtn_q, rtn_s = P.quantize_fp8_block(weight, block_size)
    rtn = output_error(weight, P.dequantize_fp8_block(rtn_q, rtn_s, block_size), hessian)
    written = output_error(weight, P.dequantize_fp8_block(q, scale_inv, block_size), hessian)
    return LayerError(name, rtn, written)


def _write_quantization_config(config_path: Path, block_size: tuple[int, int]) -> None:
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                     "activation_scheme": "dynamic",
                                     "weight_block_size": list(block_size)}
    config_path.write_text(json.dumps(config, indent=2))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m calib.block_fp8", description=__doc__.split("\n\n")[0])
    p.add_argument("--model_path", required=True, help="HF model directory or alias")
    p.add_argument("--save_directory", required=True)
    p.add_argument("--calib_file", help="JSONL calibration texts (needed by --method gptq)")
    p.add_argument("--method", default="gptq", help="gptq (default) or rtn")
    p.add_argument("--weight_block_size", type=int, nargs=2, default=[128, 128], metavar=("BN", "BK"))
    p.add_argument("--num_samples", type=int, default=32)
    p.add_argument("--max_tokens", type=int, default=512)
    p.add_argument("--device_type", default="cpu", help="cpu | cuda | npu")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no_progress", dest="progress", action="store_false")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    options = BlockFp8Options(args.model_path, args.save_directory, args.calib_file, args.method,
                              tuple(args.weight_block_size), args.num_samples, args.max_tokens,
                              args.device_type, args.overwrite, args.progress)
    try:
        report = convert(options)
    except (CalibError, ValueError, OSError) as exc:
        print(f"python -m calib.block_fp8: error: {exc}", file=sys.stderr)
        return 2
    if report.layers:
        logger.info("mean relative output error on the calibration inputs: rtn %.4f, %s %.4f",
                    report.mean("rtn"), report.method, report.mean("written"))
    logger.info("wrote %s", options.save_directory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
