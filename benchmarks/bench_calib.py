"""Calibration quality grid: method x act_method x which Linears are float / dynamic -> perplexity.

Each row calibrates SmolLM2-135M-Instruct with `calib.pipeline.run_calibration` on `--num_samples`
x `--max_tokens` tokens of calib_prose.jsonl, loads the written checkpoint in the runtime and
measures perplexity on the first `--eval_tokens` tokens of BOTH eval_tempest.txt and
eval_paradise_regained.txt in `--window`-token windows; the float model is the reference row. Each
row records the calibration time (the report's stage total) and how many of the 210 Linears ended
in each format (W8A8 static, W8A8_DYNAMIC, FLOAT).

Default grid (issue 28; ~20 rows, priority order): no smoothing and every anti-outlier method (m1
m2 m3 m4 m6) with every Linear static; the rotation recipes (T1 static, T2 dynamic down_proj, T3
dynamic + GPTQ); the same without rotation; down_proj float (the old best); act_method 2 / 3; the
fixed disable level L4. Rows are rewritten into the JSON after each, so a cut-short run keeps what
it measured. Writes benchmarks/results/calib_grid_smollm2_<date>.json.

`--targets`: only issue 28's three W8A8 targets (and, given `--llmcompressor`, llm-compressor's
checkpoint measured in the same run). Writes calib_w8a8_targets_smollm2_<date>.json.

`--w4a16`: the weight-only int4 grid instead (calib/weight_only.py; issue 28 target 4): float,
AWQ-style smoothing (m3) + GPTQ or round-to-nearest, plain GPTQ and round-to-nearest (MinMax) at
group 192 (in place of 128, which does not divide SmolLM2's hidden size 576) / 64 and per
channel, symmetric (one asymmetric round-to-nearest row), msModelSlim
W4A16 written and served by the runtime, perplexity on BOTH eval texts. GPTQ calibrates on
`--num_samples` x `--max_tokens` tokens of calib_prose.jsonl (64 x 512 in the committed run); the
MinMax rows without smoothing use no calibration data for their weights (4 x 128 tokens only
feed the report's output errors). Writes benchmarks/results/calib_w4a16_smollm2_<date>.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import platform
import tempfile
import time
from pathlib import Path

import torch

from ascend_llm import LLM
from ascend_llm.eval.perplexity import perplexity
from ascend_llm.loader.resolve import resolve_model_path
from calib.config import CalibConfig
from calib.pipeline import run_calibration
from bench_offline import cpu_model_name     # benchmarks/ is on sys.path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results"
DOWN_PROJ = ["*.mlp.down_proj"]
ROT = dict(rotation="hadamard")
# (label, options for CalibConfig) in priority order: every Linear static first
GRID: tuple[tuple[str, dict], ...] = (
    ("none act1 all static", dict(act_method=1)),
    ("m3 act1 + hadamard all static (T1)", dict(anti_method="m3", act_method=1, **ROT)),
    ("m3 act1 + hadamard, down_proj dynamic (T2)", dict(anti_method="m3", act_method=1, dynamic_names=DOWN_PROJ, **ROT)),
    ("m1 + hadamard + GPTQ all dynamic (T3)", dict(anti_method="m1", is_dynamic=True, w_method="GPTQ", **ROT)),
    ("m1 act1 all static", dict(anti_method="m1", act_method=1)),
    ("m2 act1 all static", dict(anti_method="m2", act_method=1)),
    ("m3 act1 all static", dict(anti_method="m3", act_method=1)),
    ("m4 act1 all static", dict(anti_method="m4", act_method=1)),
    ("m6 act1 all static", dict(anti_method="m6", act_method=1)),
    ("m3 act1, down_proj float (old best)", dict(anti_method="m3", act_method=1, disable_names=DOWN_PROJ)),
    ("m3 act1, down_proj dynamic", dict(anti_method="m3", act_method=1, dynamic_names=DOWN_PROJ)),
    ("m1 all dynamic", dict(anti_method="m1", is_dynamic=True)),
    ("m1 + hadamard all dynamic", dict(anti_method="m1", is_dynamic=True, **ROT)),
    ("m2 act1 + hadamard all static", dict(anti_method="m2", act_method=1, **ROT)),
    ("m6 act1 + hadamard all static", dict(anti_method="m6", act_method=1, **ROT)),
    ("none act1 + hadamard all static", dict(act_method=1, **ROT)),
    ("m3 act1 + hadamard + GPTQ all static", dict(anti_method="m3", act_method=1, w_method="GPTQ", **ROT)),
    ("none act2 all static", dict(act_method=2)),
    ("none act3 all static", dict(act_method=3)),
    ("m3 act3 + hadamard all static", dict(anti_method="m3", act_method=3, **ROT)),
    ("none act1 L4", dict(act_method=1, disable_level="L4")),
    ("m2 act1 L4", dict(anti_method="m2", act_method=1, disable_level="L4")),
)


# (label, options for CalibConfig) in priority order, every row int4 weight-only (--w_bit 4 --a_bit 16).
# SmolLM2's hidden size 576 is not a multiple of 128 (the calibrator refuses g128, naming the
# layer, as compressed-tensors' own quantizer does): 192 = 576 / 3, the group size above 128 that
# divides every input dim (576, 1536), stands in for it (coarser groups: its error bounds g128's
# from above). "AWQ" = --anti_method m3 (group-aware scale search, s = mean|x|^a).
W4A16_GRID: tuple[tuple[str, dict], ...] = (
    ("W4A16 GPTQ g64", dict(w_method="GPTQ", group_size=64)),
    ("W4A16 GPTQ g192", dict(w_method="GPTQ", group_size=192)),
    ("W4A16 AWQ RTN g64", dict(w_method="MinMax", group_size=64, anti_method="m3")),
    ("W4A16 AWQ RTN g192", dict(w_method="MinMax", group_size=192, anti_method="m3")),
    ("W4A16 AWQ + GPTQ g192", dict(w_method="GPTQ", group_size=192, anti_method="m3")),
    ("W4A16 RTN g64 asymmetric", dict(w_method="MinMax", group_size=64, w_sym=False)),
    ("W4A16 RTN g64", dict(w_method="MinMax", group_size=64)),
    ("W4A16 RTN g192", dict(w_method="MinMax", group_size=192)),
    ("W4A16 RTN per-channel", dict(w_method="MinMax", group_size=0)),
    ("W4A16 GPTQ per-channel", dict(w_method="GPTQ", group_size=0)),
    ("W4A16 AWQ + GPTQ g64", dict(w_method="GPTQ", group_size=64, anti_method="m3")),
)
EVAL_TEXTS = ("eval_tempest.txt", "eval_paradise_regained.txt")

# `--targets`: issue 28's W8A8 targets, both eval texts. (label, options for CalibConfig, target)
TARGET_GRID: tuple[tuple[str, dict, str], ...] = (
    ("T1 all static: m3 + hadamard down_proj", dict(anti_method="m3", act_method=1, rotation="hadamard"),
     "<= 1.05x, every Linear static W8A8"),
    ("T2 static + dynamic down_proj: m3 + hadamard",
     dict(anti_method="m3", act_method=1, rotation="hadamard", dynamic_names=["*.mlp.down_proj"]),
     "<= 1.02x, down_proj W8A8_DYNAMIC"),
    ("T3 all dynamic: m1 + hadamard + GPTQ",
     dict(anti_method="m1", is_dynamic=True, rotation="hadamard", w_method="GPTQ"),
     "<= llm-compressor SmoothQuant 0.8 + GPTQ"),
    ("T1 all static: m3 + hadamard + GPTQ",
     dict(anti_method="m3", act_method=1, rotation="hadamard", w_method="GPTQ"), "<= 1.05x"),
    ("old: m3 all static (no rotation)", dict(anti_method="m3", act_method=1), "(the 1.18x-1.41x baseline)"),
    ("T3 all dynamic: m1 + GPTQ (no rotation)", dict(anti_method="m1", is_dynamic=True, w_method="GPTQ"),
     "<= llm-compressor"),
)


def eval_ids(tokenizer, num_tokens: int, name: str = "eval_tempest.txt") -> list[int]:
    """The first `num_tokens` token ids of shared/data/`name`."""
    return tokenizer((SHARED / name).read_text())["input_ids"][:num_tokens]


def measure(model_dir: str, ids: list[int], window: int) -> float:
    """Perplexity of the checkpoint in `model_dir` served by the runtime."""
    llm = LLM(model_dir, max_model_len=window + 64, enforce_eager=True)
    return perplexity(llm, ids, window).perplexity


def calibrate_w4a16_row(row, args, work: Path) -> dict:
    label, options = row
    out = work / "ckpt"
    data = options["w_method"] == "GPTQ" or "anti_method" in options      # rows that learn from calibration text
    report = run_calibration(CalibConfig(
        model_path="smollm2-135m-instruct", save_directory=str(out), calib_file=str(SHARED / "calib_prose.jsonl"),
        w_bit=4, a_bit=16, num_samples=args.num_samples if data else 4, max_tokens=args.max_tokens if data else 128,
        progress=False, overwrite=True, **options))
    summary = report.weight_only
    return {"label": label, "options": options, "w_method": options["w_method"], "group_size": options["group_size"],
            "w_sym": options.get("w_sym", True), "anti_method": options.get("anti_method", "none"),
            "calib_tokens": f"{args.num_samples} x {args.max_tokens}" if data else "none (MinMax)",
            "quantized_linears": sum(r.quant_type == "W4A16" for r in report.layers),
            "total_linears": len(report.layers), "calib_seconds": round(sum(report.stage_seconds.values()), 1),
            "stage_seconds": report.stage_seconds,
            "mean_output_error_rtn": round(summary["mean_output_error_rtn"], 5),
            "mean_output_error_written": round(summary["mean_output_error_written"], 5),
            "damp_used": summary["damp_used"], "ckpt": str(out)}


def print_w4a16_table(rows: list[dict]) -> None:
    base = rows[0]["perplexity"]
    print(f"{'row':28} {'tempest':>8} {'x float':>7} {'paradise':>8} {'x float':>7} {'out err':>7} {'calib s':>7}")
    for r in rows:
        ppl = r["perplexity"]
        cells = " ".join(f"{ppl[t]:8.3f} {ppl[t] / base[t]:7.3f}" if t in ppl else f"{'-':>8} {'-':>7}"
                         for t in EVAL_TEXTS)
        err = f"{r['mean_output_error_written']:.4f}" if "mean_output_error_written" in r else "-"
        print(f"{r['label']:28} {cells} {err:>7} {r.get('calib_seconds', 0):7.1f}")


def format_counts(types: list[str]) -> dict:
    """How many Linears ended in each format, and the fraction of all Linears."""
    return {t: {"count": types.count(t), "fraction": round(types.count(t) / len(types), 4)}
            for t in sorted(set(types))}


def calibrate_w8a8_row(row, args, work: Path) -> dict:
    """Calibrate one (label, options, target) W8A8 row into work/ckpt; its report fields."""
    label, options, target = row
    out = work / "ckpt"
    report = run_calibration(CalibConfig(
        model_path="smollm2-135m-instruct", save_directory=str(out), calib_file=str(SHARED / "calib_prose.jsonl"),
        num_samples=args.num_samples, max_tokens=args.max_tokens, progress=False, overwrite=True, **options))
    return {"label": label, "target": target, "options": options,
            "linears": format_counts([r.quant_type for r in report.layers]),
            "calib_seconds": round(sum(report.stage_seconds.values()), 1),
            "stage_seconds": report.stage_seconds, "ckpt": str(out)}


def main_grid(args, model_dir: Path, grid, out_name: str, calibrate=calibrate_w8a8_row, printer=None,
              note: str = "shared 2-core CPU; lm_head / embeddings float") -> None:
    """Float, then each row of `grid` calibrated by `calibrate` (and, given, llm-compressor's
    checkpoint): perplexity on both eval texts in the same run, ratio to float, calibration time.
    Rows in priority order; the JSON is rewritten after each; `printer` prints the table."""
    from transformers import AutoTokenizer

    out_path = Path(args.out) if args.out else RESULTS / f"{out_name}_{dt.date.today().isoformat()}.json"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = {name: eval_ids(tokenizer, args.eval_tokens, name) for name in EVAL_TEXTS}
    meta = {"model": "smollm2-135m-instruct", "eval_tokens": {n: len(i) for n, i in texts.items()},
            "window": args.window, "calib": f"calib_prose.jsonl, {args.num_samples} x {args.max_tokens} tokens",
            "threads": args.threads, "machine": platform.platform(), "cpu": cpu_model_name(), "note": note}

    def evaluate(ckpt: str) -> tuple[dict, float]:
        t0 = time.perf_counter()
        return ({name: measure(ckpt, ids, args.window) for name, ids in texts.items()},
                round(time.perf_counter() - t0, 1))

    def save(rows: list[dict]) -> None:
        out_path.write_text(json.dumps({**meta, "float_perplexity": rows[0]["perplexity"], "rows": rows}, indent=2))

    ppl, seconds = evaluate(str(model_dir))
    rows = [{"label": "float", "perplexity": ppl, "eval_seconds": seconds}]

    def add(result: dict, ckpt: str) -> None:
        result["perplexity"], result["eval_seconds"] = evaluate(ckpt)
        result["ratio_to_float"] = {t: round(result["perplexity"][t] / ppl[t], 4) for t in EVAL_TEXTS}
        rows.append(result)
        save(rows)
        logging.warning("%s: %s calib %.0fs", result["label"], result["ratio_to_float"], result.get("calib_seconds", 0))

    if args.llmcompressor:
        manifest = Path(args.llmcompressor) / "MANIFEST.json"
        add({"label": "llm-compressor SmoothQuant 0.8 + GPTQ W8A8 (dynamic)", "target": "the yardstick of T3",
             "tool": json.loads(manifest.read_text()) if manifest.exists() else None}, args.llmcompressor)
    with tempfile.TemporaryDirectory() as tmp:
        for row in grid[:args.rows or len(grid)]:
            result = calibrate(row, args, Path(tmp))
            add(result, result.pop("ckpt"))
    (printer or print_grid)(rows)
    print(f"wrote {out_path}")


def print_grid(rows: list[dict]) -> None:
    base = rows[0]["perplexity"]
    print(f"{'row':46} {'tempest':>8} {'x float':>7} {'paradise':>8} {'x float':>7} {'static/dyn/float':>16} "
          f"{'calib s':>7}")
    for r in rows:
        cells = " ".join(f"{r['perplexity'][t]:8.3f} {r['perplexity'][t] / base[t]:7.3f}" for t in EVAL_TEXTS)
        n = {t: c["count"] for t, c in r.get("linears", {}).items()}
        mix = f"{n.get('W8A8', 0)}/{n.get('W8A8_DYNAMIC', 0)}/{n.get('FLOAT', 0)}" if n else "-"
        print(f"{r['label']:46} {cells} {mix:>16} {r.get('calib_seconds', 0):7.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval_tokens", type=int, default=16384)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--num_samples", type=int, default=32)
    parser.add_argument("--max_tokens", type=int, default=512)
    parser.add_argument("--rows", type=int, default=None, help="run only the first N grid rows")
    parser.add_argument("--w4a16", action="store_true", help="the W4A16 (int4 weight-only) grid, both eval texts")
    parser.add_argument("--targets", action="store_true",
                        help="issue 28's W8A8 targets (static / static + dynamic down_proj / dynamic + GPTQ), both texts")
    parser.add_argument("--llmcompressor", default=None,
                        help="with --targets: llm-compressor's checkpoint (scripts/peer_llmcompressor_smollm2.py)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (shared machine: 1)")
    parser.add_argument("--out", default=None, help="JSON path (default results/<grid>_smollm2_<date>.json)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    model_dir = resolve_model_path("smollm2-135m-instruct")
    if args.w4a16:
        main_grid(args, Path(model_dir), W4A16_GRID, "calib_w4a16_smollm2", calibrate_w4a16_row, print_w4a16_table,
                  note="shared 2-core CPU; int4 symmetric unless w_sym false, lm_head / embeddings float; MinMax rows "
                       "without smoothing calibrate on 4 x 128 tokens (report only)")
        return
    if args.targets:
        main_grid(args, Path(model_dir), TARGET_GRID, "calib_w8a8_targets_smollm2")
        return
    main_grid(args, Path(model_dir), [(label, options, "") for label, options in GRID], "calib_grid_smollm2")


if __name__ == "__main__":
    main()
