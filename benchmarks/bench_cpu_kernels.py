"""Batch-1 decode on CPU with our C++ kernels against the reference torch kernels, in one run.

Each configuration builds its own engine on SmolLM2-135M (fp32) and decodes the same prompt
greedily (best of three runs of `--output-len` tokens); the baseline is the reference kernels of
ops/cpu.py for the small ops with MKL / oneDNN linear layers. Also checks that every
configuration produces the same tokens. Prints a table and writes JSON under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import time
from pathlib import Path

import torch

from ascend_llm import LLM, SamplingParams

_SMALL_OPS = ("rms_norm", "add_rms_norm", "rope", "silu_and_mul", "reshape_and_cache", "paged_attention")
_REFERENCE_SMALL_OPS = ",".join(f"cpu.fused_{op}" for op in _SMALL_OPS)
# name -> (ASCEND_LLM_CPU_LINEAR, ASCEND_LLM_DISABLE_KERNELS)
CONFIGS = {
    "reference ops, MKL/oneDNN linears (baseline)": ("mkl", _REFERENCE_SMALL_OPS),
    "fused ops, MKL/oneDNN linears": ("mkl", ""),
    "fused ops, our GEMV": ("gemv", ""),
    "reference ops, our GEMV": ("gemv", _REFERENCE_SMALL_OPS),
}
PROMPT = "The history of the city of Rome begins"


def measure(linear: str, disabled: str, args: argparse.Namespace) -> tuple[float, list[int]]:
    """Best decode tok/s over three runs and the generated token ids."""
    os.environ["ASCEND_LLM_CPU_LINEAR"], os.environ["ASCEND_LLM_DISABLE_KERNELS"] = linear, disabled
    llm = LLM(model=args.model, dtype="float32", kv_cache_memory_gb=0.25)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=8))      # warm-up
    best, tokens = 0.0, []
    for _ in range(3):
        start = time.perf_counter()
        out = llm.generate([PROMPT], params, use_tqdm=False)
        best = max(best, args.output_len / (time.perf_counter() - start))
        tokens = list(out[0].outputs[0].token_ids)
    return best, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows, outputs = {}, {}
    for name, (linear, disabled) in CONFIGS.items():
        rows[name], outputs[name] = measure(linear, disabled, args)
    base = rows[next(iter(CONFIGS))]
    print(f"\n| kernels | tok/s | x baseline |\n|---|---|---|")
    for name, rate in rows.items():
        print(f"| {name} | {rate:.1f} | {rate / base:.2f} |")
    same = len({tuple(t) for t in outputs.values()}) == 1
    print(f"same greedy tokens in every configuration: {same}")
    from bench_offline import cpu_model_name, machine_slug     # benchmarks/ is on sys.path
    result = {"date": dt.date.today().isoformat(), "machine": cpu_model_name(),
              "num_threads": torch.get_num_threads(), "model": args.model, "dtype": "float32",
              "output_len": args.output_len, "batch1_decode_tok_s": rows,
              "ratio_vs_baseline": {name: rate / base for name, rate in rows.items()},
              "same_greedy_tokens": same}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"cpu_kernels_{result['date']}_{machine_slug(result['machine'])}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {path}")


if __name__ == "__main__":
    main()
