"""Tensor-parallel scaling: TP=N vs TP=1 throughput of the same model, same run, same machine.

For each TP size the engine runs in this process (rank 0) plus N-1 worker processes (mp executor,
gloo on CPU). Reported per size: batch-1 decode tokens/s and the aggregate tokens/s of
`--num-seqs` concurrent requests. On CPU the thread budget is fixed (`--threads`, split evenly
over the ranks) so the comparison is of the same cores, not of more cores.

The default model is a synthetic random Llama (hidden 1024, 16 heads / 8 KV heads, 8 layers,
vocab 32000, ~180M parameters; its head counts divide 2 and 4); `--model smollm2-135m-instruct`
needs `--tp 1 3` (9 heads). Writes JSON under benchmarks/results/.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_tp.py --tp 1 2 --threads 2
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from ascend_llm import LLM, SamplingParams

logger = logging.getLogger("bench_tp")
RESULTS = Path(__file__).resolve().parent / "results"


def synthetic_llama(path: Path) -> Path:
    """A random Llama checkpoint (+ the tiny test tokenizer) whose head counts divide 2, 4, 8."""
    from transformers import LlamaConfig, LlamaForCausalLM
    sys.path.insert(0, str(RESULTS.parents[1]))             # the repository root, for tests.tiny_models
    from tests.tiny_models import make_tokenizer
    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                         num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=2048,
                         tie_word_embeddings=False, eos_token_id=2, bos_token_id=1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() == 2 else p.fill_(1.0)
    model.save_pretrained(path, safe_serialization=True)
    make_tokenizer().save_pretrained(path)
    return path


def measure(model: str, tp: int, threads: int, args: argparse.Namespace) -> dict:
    """Decode rates of one TP size (a fresh engine and workers)."""
    per_rank = max(1, threads // tp)
    os.environ["OMP_NUM_THREADS"] = str(per_rank)          # spawned workers read it at start
    torch.set_num_threads(per_rank)
    started = time.perf_counter()
    llm = LLM(model, tensor_parallel_size=tp, max_model_len=512, device="cpu", dtype="float32")
    startup_s = time.perf_counter() - started
    prompts = [[(13 * i + 7 * j) % 30000 + 3 for j in range(args.prompt_len)] for i in range(args.num_seqs)]
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    try:
        llm.generate(prompt_token_ids=prompts[:1], sampling_params=SamplingParams(max_tokens=4), use_tqdm=False)
        single = _rate(llm, prompts[:1], params)
        batch = _rate(llm, prompts, params)
    finally:
        llm.shutdown()
    result = {"tp": tp, "threads_per_rank": per_rank, "threads_total": per_rank * tp,
              "startup_s": round(startup_s, 2),
              "batch1_tok_s": single, f"batch{args.num_seqs}_tok_s": batch}
    logger.info("%s", result)
    return result


def _rate(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> float:
    start = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return round(sum(len(o.outputs[0].token_ids) for o in outs) / elapsed, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model dir or alias (default: synthetic Llama)")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=2,
                        help="CPU threads shared by all ranks (at least 1 per rank)")
    parser.add_argument("--num-seqs", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(synthetic_llama(Path(tmp)))
        runs = [measure(model, tp, args.threads, args) for tp in args.tp]
    base = runs[0]
    for run in runs:
        run["speedup_batch1"] = round(run["batch1_tok_s"] / base["batch1_tok_s"], 3)
        key = f"batch{args.num_seqs}_tok_s"
        run[f"speedup_batch{args.num_seqs}"] = round(run[key] / base[key], 3)
    report = {"date": dt.date.today().isoformat(), "device": "cpu", "cpu_count": os.cpu_count(),
              "model": args.model or "synthetic-llama-180m", "threads": args.threads,
              "prompt_len": args.prompt_len, "output_len": args.output_len, "runs": runs}
    RESULTS.mkdir(exist_ok=True)
    tps = "-".join(str(tp) for tp in args.tp)
    out = RESULTS / f"tp_cpu_{report['date']}_tp{tps}_threads{args.threads}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
