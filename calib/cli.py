"""`python -m calib` / `ascend-llm-calib`: msModelSlim `quant_llama.py`-compatible arguments.

Exit codes: 0 done, 2 bad options or inputs (the problem is printed, no traceback).
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from calib.config import ACT_METHODS, CalibError, build_config


def _bool(value: str) -> bool:
    """msModelSlim scripts pass booleans as words (`--is_dynamic True`)."""
    lowered = value.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    """Every option defaults to None so a recipe's value is only overridden when given."""
    p = argparse.ArgumentParser(prog="ascend-llm-calib",
                                description="Calibrate a float HF Llama / Qwen2 checkpoint into an "
                                            "msModelSlim ascendV1 W8A8 / W8A8_DYNAMIC / W8A16 / W4A16 "
                                            "checkpoint (W4A16 / W8A16 also as compressed-tensors).")
    p.add_argument("--model_path", help="HF model directory or alias (e.g. smollm2-135m-instruct)")
    p.add_argument("--save_directory", help="output directory")
    p.add_argument("--calib_file", help="JSONL calibration data (inputs_pretokenized | text | prompt)")
    p.add_argument("--recipe", help="YAML recipe file or bundled recipe name; flags override it")
    p.add_argument("--device_type", help="cpu | cuda | npu")
    p.add_argument("--w_bit", type=int, help="weight bits: 8, or 4 (weight-only, with --a_bit 16)")
    p.add_argument("--a_bit", type=int, help="activation bits: 8 (W8A8) or 16 (W8A16 / W4A16)")
    p.add_argument("--w_method", help="weight rounding: MinMax (default) or GPTQ (weight-only runs)")
    p.add_argument("--group_size", type=int,
                   help="weight-only: input columns per scale (e.g. 128, 64; 0 = per channel)")
    p.add_argument("--w_sym", type=_bool, help="weight-only: True (default) symmetric, "
                                                "False asymmetric with zero points (weight_offset)")
    p.add_argument("--save_format", help="weight-only: ascendv1 (default, msModelSlim) or "
                                         "compressed-tensors (pack-quantized, vLLM / HF)")
    p.add_argument("--act_method", type=int,
                   help=", ".join(f"{k} {v}" for k, v in ACT_METHODS.items()))
    p.add_argument("--anti_method", help="anti-outlier method m1..m6 (omit for none)")
    p.add_argument("--disable_level", help="Lk: keep the k most sensitive Linears in float")
    p.add_argument("--disable_names", nargs="*", help="Linear names forced to float")
    p.add_argument("--dynamic_names", nargs="*",
                   help="Linear names / globs made W8A8_DYNAMIC (per-token) in a static W8A8 run, "
                        "e.g. '*.mlp.down_proj'")
    p.add_argument("--rotation", help="hadamard: smooth + online Hadamard before every mlp.down_proj "
                                      "(QuaRot R4; such checkpoints run in ascend-llm only)")
    p.add_argument("--hadamard_block_size", type=int,
                   help="block of --rotation hadamard (power of two; default: largest dividing "
                        "intermediate_size, at most 512)")
    p.add_argument("--speed_aware", metavar="PATH|auto",
                   help="keep in float the Linears `ascend-llm inspect --bench --bench-output PATH` "
                        "measured slower than float on the target backend; auto: measure them here first, "
                        "on --device_type")
    p.add_argument("--speed_aware_batch", type=int,
                   help="the batch size whose --speed_aware timings decide (default 1: decode)")
    p.add_argument("--is_dynamic", nargs="?", const=True, type=_bool,
                   help="per-token dynamic activations (W8A8_DYNAMIC)")
    p.add_argument("--use_kvcache_quant", nargs="?", const=True, type=_bool,
                   help="write C8 int8 KV-cache scales (symmetric, as msModelSlim writes them)")
    p.add_argument("--kv_asymmetric", nargs="?", const=True, type=_bool,
                   help="C8 KV scales with asymmetric offsets (this runtime only: vllm-ascend ignores the offset)")
    p.add_argument("--mixed_format", nargs="?", const=True, type=_bool,
                   help="MoFQ: per layer INT8 (W8A8_DYNAMIC) or FP8 (WFP8AFP8_DYNAMIC) by output error")
    p.add_argument("--num_samples", type=int, help="calibration texts to use (default 16)")
    p.add_argument("--max_tokens", type=int, help="tokens per calibration text (default 128)")
    p.add_argument("--sample_tokens", type=int, help="input rows kept per layer for error scoring")
    p.add_argument("--part_file_size", type=float, help="GB per safetensors shard (0 = one file)")
    p.add_argument("--seed", type=int)
    p.add_argument("--overwrite", action="store_const", const=True,
                   help="replace the content of a non-empty --save_directory")
    p.add_argument("--no_progress", dest="progress", action="store_const", const=False,
                   help="hide the progress bars")
    p.add_argument("--quiet", action="store_true", help="do not print the summary table")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, calibrate, print the summary; returns the exit code."""
    args = vars(build_parser().parse_args(argv))
    quiet = args.pop("quiet")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        from calib.pipeline import run_calibration

        report = run_calibration(build_config(args))
    except (CalibError, ValueError, FileNotFoundError) as exc:
        print(f"ascend-llm-calib: error: {exc}", file=sys.stderr)
        return 2
    if not quiet:
        print(report.format_table())
        print(f"wrote {report.save_directory} ({report.model_quant_type})")
    return 0
