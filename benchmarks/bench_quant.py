"""Per quantization method: loaded weight bytes and batch-1 decode tokens/s beside the float model.

Methods: float, wint8, wint4, fp8, block_wise_fp8 (online from the float checkpoint), W8A8 and
W8A8_DYNAMIC (msModelSlim checkpoints written by `calib.pipeline.run_calibration`, small
calibration: 8 texts x 128 tokens), wint2 (MLP WINT2 + attention wint8, written by
`calib.wint2.writer`). Every method is measured in the same run, so the ratios to float
compare like with like on this machine. Weight bytes come from `calib.weight_bytes`
(linear layers, embedding, LM head and the rest; a tied LM head counts once, as the embedding).

    .venv/bin/python benchmarks/bench_quant.py [--model smollm2-135m-instruct] [--methods ...]

Prints a table and writes benchmarks/results/quant_cpu_<date>.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from ascend_llm import LLM, SamplingParams
from ascend_llm.loader import resolve_model_path
from calib.weight_bytes import weight_bytes
from calib.wint2.writer import write_wint2_checkpoint

logger = logging.getLogger("bench_quant")
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
ONLINE = ("wint8", "wint4", "fp8", "block_wise_fp8")
METHODS = ("float", *ONLINE, "W8A8", "W8A8_DYNAMIC", "wint2")
REPEATS = 3                         # decode rate: median of this many runs (the machine is noisy)


def prepare_checkpoint(method: str, model_dir: Path, work: Path) -> tuple[Path, str | None]:
    """(directory, --quantization name) that loads `method`; offline formats are written first."""
    if method == "float":
        return model_dir, None
    if method in ONLINE:
        return model_dir, method
    out = work / method.lower()
    if method == "wint2":
        write_wint2_checkpoint(model_dir, out)
        return out, None
    from calib.config import CalibConfig
    from calib.pipeline import run_calibration

    run_calibration(CalibConfig(model_path=str(model_dir), save_directory=str(out),
                                calib_file=str(DATA / "calib_prose.jsonl"), num_samples=8, max_tokens=128,
                                is_dynamic=method == "W8A8_DYNAMIC", progress=False))
    return out, None


def decode_rate(llm: LLM, prompt: list[int], output_len: int) -> float:
    """Batch-1 decode tokens/s: (tokens - 1) / (generate time - prefill time), median of REPEATS."""
    def timed(max_tokens: int) -> tuple[int, float]:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        start = time.perf_counter()
        out = llm.generate(prompt_token_ids=[prompt], sampling_params=params, use_tqdm=False)[0]
        return len(out.outputs[0].token_ids), time.perf_counter() - start

    timed(4)                                                          # warm-up
    rates = []
    for _ in range(REPEATS):
        _, prefill = timed(1)
        new, total = timed(output_len)
        rates.append((new - 1) / max(1e-9, total - prefill))
    return sorted(rates)[len(rates) // 2]


def measure(method: str, model_dir: Path, work: Path, prompt_len: int, output_len: int) -> dict:
    path, quantization = prepare_checkpoint(method, model_dir, work)
    llm = LLM(str(path), quantization=quantization, max_model_len=prompt_len + output_len + 8)
    counted = weight_bytes(llm.llm_engine.model_runner.model)
    text = (DATA / "eval_tempest.txt").read_text()
    prompt = llm.get_tokenizer().encode(text, add_special_tokens=False)[:prompt_len]
    row = {"method": method, "weight_bytes": counted.total, "parts": dict(counted.parts),
           "by_dtype": {part: dict(d) for part, d in counted.by_dtype.items()},
           "decode_tok_s": decode_rate(llm, prompt, output_len)}
    del llm
    gc.collect()
    return row


def add_ratios(rows: list[dict]) -> None:
    base = next(r for r in rows if r["method"] == "float")
    for row in rows:
        row["linear_bytes_ratio"] = row["parts"]["linear"] / base["parts"]["linear"]
        row["weight_bytes_ratio"] = row["weight_bytes"] / base["weight_bytes"]
        row["decode_ratio"] = row["decode_tok_s"] / base["decode_tok_s"]


def print_table(rows: list[dict]) -> None:
    mib = 1 << 20
    print(f"{'method':<16}{'linear MiB':>11}{'ratio':>7}{'embed MiB':>10}{'head MiB':>9}"
          f"{'total MiB':>10}{'ratio':>7}{'decode tok/s':>13}{'ratio':>7}")
    for r in rows:
        print(f"{r['method']:<16}{r['parts']['linear'] / mib:>11.1f}{r['linear_bytes_ratio']:>7.3f}"
              f"{r['parts']['embedding'] / mib:>10.1f}{r['parts']['lm_head'] / mib:>9.1f}"
              f"{r['weight_bytes'] / mib:>10.1f}{r['weight_bytes_ratio']:>7.3f}"
              f"{r['decode_tok_s']:>13.1f}{r['decode_ratio']:>7.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="float checkpoint dir or alias")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default=None, help="JSON path (default results/quant_cpu_<date>.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = ["float", *[m for m in args.methods if m != "float"]]
    model_dir = Path(resolve_model_path(args.model))
    with tempfile.TemporaryDirectory(prefix="bench_quant_") as work:
        rows = []
        for method in methods:
            logger.info("measuring %s", method)
            rows.append(measure(method, model_dir, Path(work), args.prompt_len, args.output_len))
    add_ratios(rows)
    print_table(rows)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"quant_cpu_{dt.date.today()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "torch_threads": torch.get_num_threads(),
                               "prompt_len": args.prompt_len, "output_len": args.output_len,
                               "repeats": REPEATS, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
