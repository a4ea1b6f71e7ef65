"""Offline decode benchmark: our engine vs HF transformers `generate`, measured in the same run.

Reports batch-1 decode tokens/s and aggregate throughput of N concurrent requests
(prompt_len prompt + output_len new tokens each), the ratios to HF's batch-1 rate, and the
physical limit of batch-1 decode: every token must stream all weights once, so the limit is
1 / (time to read every weight tensor once), measured on the same weights in the same run.
Writes JSON under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import resource
import time
from pathlib import Path

import torch

from ascend_llm import LLM, SamplingParams
from ascend_llm.loader import resolve_model_path
from ascend_llm.ops import build_op_set
from ascend_llm.ops.cpu_linear_choice import linear_choice

_SMALL_OPS = ("rms_norm", "add_rms_norm", "rope", "silu_and_mul", "reshape_and_cache", "paged_attention")

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "eval_tempest.txt"


def make_prompts(tokenizer, num: int, prompt_len: int) -> list[list[int]]:
    """`num` different real-text windows of exactly prompt_len tokens."""
    text = DATA.read_text() if DATA.exists() else "The quick brown fox jumps over the lazy dog. " * 2000
    ids = tokenizer.encode(text, add_special_tokens=False)
    stride = max(1, (len(ids) - prompt_len) // max(1, num))
    return [ids[i * stride: i * stride + prompt_len] for i in range(num)]


REPEATS = 3   # batch-1 rates are the median of this many runs (the machine is noisy)


def _median_rate(run_once) -> dict:
    runs = sorted((run_once() for _ in range(REPEATS)), key=lambda r: r["decode_tok_s"])
    result = dict(runs[len(runs) // 2])
    result["all_decode_tok_s"] = [r["decode_tok_s"] for r in runs]
    return result


def cpu_model_name() -> str:
    """/proc/cpuinfo's `model name` (platform.processor() is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_slug(name: str) -> str:
    """A file-name tag for the CPU kind: results differ by 2x between AMD and Intel hosts."""
    lowered = name.lower()
    for key in ("epyc", "xeon", "ryzen", "core"):
        if key in lowered:
            return key
    return "".join(c for c in lowered if c.isalnum())[:16] or "cpu"


def weight_stream_limit(model: torch.nn.Module) -> dict:
    """Decode tokens/s if a step did nothing but read each (unique) weight tensor once."""
    params = list({p.data_ptr(): p for p in model.parameters()}.values())
    nbytes = sum(p.numel() * p.element_size() for p in params)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for p in params:
            p.sum()
        best = min(best, time.perf_counter() - start)
    return {"weight_bytes": nbytes, "read_gb_s": nbytes / best / 1e9, "decode_tok_s": 1 / best}


NGRAM = {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4}
SPEC_PROMPTS = 8   # speculative rates depend on the text: averaged over this many prompts, each alone


def hf_decode_rate(model_dir: Path, prompt: list[int], output_len: int,
                   spec_prompts: list[list[int]] | None = None) -> dict:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    kwargs = dict(do_sample=False, pad_token_id=0)

    def generate(n: int) -> tuple[int, float]:
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
        return out.shape[1] - ids.shape[1], time.perf_counter() - t0

    def run_once() -> dict:
        _, t_prefill = generate(1)
        new, t_total = generate(output_len)
        return {"new_tokens": new, "seconds": t_total,
                "decode_tok_s": (new - 1) / max(1e-9, t_total - t_prefill)}

    with torch.inference_mode():
        generate(4)   # warm-up
        result = _median_rate(run_once)
        result["limit"] = weight_stream_limit(model)
        if spec_prompts:
            result["prompt_lookup"] = hf_prompt_lookup_rate(model, spec_prompts, output_len)
        return result


def hf_prompt_lookup_rate(model: torch.nn.Module, prompts: list[list[int]], output_len: int) -> dict:
    """HF's own n-gram speculation (`prompt_lookup_num_tokens`) over the same prompts as ours."""
    lookup = dict(do_sample=False, pad_token_id=0, prompt_lookup_num_tokens=NGRAM["num_speculative_tokens"],
                  max_matching_ngram_size=NGRAM["prompt_lookup_max"])
    new_tokens, decode_s = 0, 0.0
    for prompt in prompts:
        ids = torch.tensor([prompt])
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, **lookup)
        t_prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=output_len, min_new_tokens=output_len, **lookup)
        new = out.shape[1] - ids.shape[1]
        new_tokens += new - 1
        decode_s += max(1e-9, time.perf_counter() - t0 - t_prefill)
    return {"num_prompts": len(prompts), "decode_tok_s": new_tokens / decode_s}


def ours_run(llm: LLM, prompts: list[list[int]], output_len: int) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    new = sum(len(o.outputs[0].token_ids) for o in outs)
    ttfts = [o.metrics.first_token_time - o.metrics.arrival_time for o in outs]
    return {"new_tokens": new, "seconds": seconds, "tok_s": new / seconds,
            "mean_ttft_s": sum(ttfts) / len(ttfts)}


def ours_decode(llm: LLM, prompt: list[int], output_len: int) -> tuple[dict, int, float]:
    """(the run, its decode tokens, its decode seconds): a 1-token run's time is the prefill."""
    t_prefill = ours_run(llm, [prompt], 1)["seconds"]
    run = ours_run(llm, [prompt], output_len)
    return run, run["new_tokens"] - 1, max(1e-9, run["seconds"] - t_prefill)


def ours_decode_rate(llm: LLM, prompt: list[int], output_len: int) -> dict:
    def run_once() -> dict:
        run, tokens, seconds = ours_decode(llm, prompt, output_len)
        run["decode_tok_s"] = tokens / seconds
        return run

    ours_run(llm, [prompt], 4)                       # warm-up
    return _median_rate(run_once)


def ours_multi_prompt_rate(llm: LLM, prompts: list[list[int]], output_len: int) -> dict:
    """Batch-1 decode rate over several prompts, each run alone: total decode tokens / total
    decode seconds, with the engine's draft acceptance over the runs."""
    ours_run(llm, [prompts[0]], 4)                   # warm-up
    before = llm.llm_engine.stats()
    new_tokens, decode_s = 0, 0.0
    for prompt in prompts:
        _, tokens, seconds = ours_decode(llm, prompt, output_len)
        new_tokens, decode_s = new_tokens + tokens, decode_s + seconds
    return {"num_prompts": len(prompts), "decode_tok_s": new_tokens / decode_s, **spec_stats(llm, before)}


def spec_stats(llm: LLM, before: dict) -> dict:
    stats = llm.llm_engine.stats()
    drafts = stats["spec_decode_num_draft_tokens"] - before["spec_decode_num_draft_tokens"]
    accepted = stats["spec_decode_num_accepted_tokens"] - before["spec_decode_num_accepted_tokens"]
    return {"draft_tokens": drafts, "accepted_tokens": accepted,
            "acceptance_rate": accepted / drafts if drafts else 0.0}


def ours_speculative(args: argparse.Namespace, prompts: list[list[int]]) -> dict:
    """Batch-1 (over SPEC_PROMPTS prompts) and concurrent rates with n-gram drafts (NGRAM)."""
    llm = LLM(args.model, dtype="float32", max_model_len=2048, enable_prefix_caching=False,
              kv_cache_memory_gb=args.kv_cache_memory_gb, speculative_config=NGRAM)
    batch1 = ours_multi_prompt_rate(llm, prompts[:SPEC_PROMPTS], args.output_len)
    before = llm.llm_engine.stats()
    concurrent = ours_run(llm, prompts, args.output_len)
    concurrent.update(spec_stats(llm, before))
    return {"config": NGRAM, "batch1": batch1, "concurrent": concurrent}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--kv-cache-memory-gb", type=float, default=0.5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(torch.get_num_threads())
    model_dir = resolve_model_path(args.model)
    # KV sized so the 32 x 256-token workload fits without preemption
    llm = LLM(args.model, dtype="float32", max_model_len=2048, enable_prefix_caching=False,
              kv_cache_memory_gb=args.kv_cache_memory_gb)
    prompts = make_prompts(llm.get_tokenizer(), args.num_requests, args.prompt_len)
    ours_b1 = ours_decode_rate(llm, prompts[0], args.output_len)
    ours_b1_prompts = ours_multi_prompt_rate(llm, prompts[:SPEC_PROMPTS], args.output_len)
    ours_batch = ours_run(llm, prompts, args.output_len)
    del llm
    spec = ours_speculative(args, prompts)
    hf_b1 = hf_decode_rate(model_dir, prompts[0], args.output_len, prompts[:SPEC_PROMPTS])
    hf_rate = hf_b1["decode_tok_s"]
    n = SPEC_PROMPTS
    rows = [("HF transformers generate, batch 1 decode", hf_rate, 1.0),
            ("ascend-llm, batch 1 decode", ours_b1["decode_tok_s"], ours_b1["decode_tok_s"] / hf_rate),
            (f"ascend-llm, {args.num_requests} concurrent (aggregate)", ours_batch["tok_s"],
             ours_batch["tok_s"] / hf_rate),
            (f"ascend-llm, batch 1, mean of {n} prompts", ours_b1_prompts["decode_tok_s"],
             ours_b1_prompts["decode_tok_s"] / hf_rate),
            (f"ascend-llm + ngram spec, batch 1, {n} prompts", spec["batch1"]["decode_tok_s"],
             spec["batch1"]["decode_tok_s"] / hf_rate),
            (f"ascend-llm + ngram spec, {args.num_requests} concurrent", spec["concurrent"]["tok_s"],
             spec["concurrent"]["tok_s"] / hf_rate),
            (f"HF + prompt lookup, batch 1, {n} prompts", hf_b1["prompt_lookup"]["decode_tok_s"],
             hf_b1["prompt_lookup"]["decode_tok_s"] / hf_rate)]
    limit = hf_b1.pop("limit")
    rows.append((f"batch-1 limit: stream {limit['weight_bytes'] / 1e6:.0f} MB at "
                 f"{limit['read_gb_s']:.1f} GB/s", limit["decode_tok_s"],
                 limit["decode_tok_s"] / hf_b1["decode_tok_s"]))
    print(f"\n{'run':<48} {'tok/s':>9} {'x HF b1':>8}")
    for name, rate, ratio in rows:
        print(f"{name:<48} {rate:9.1f} {ratio:8.2f}")
    print(f"batch-1 decode: ours at {ours_b1['decode_tok_s'] / limit['decode_tok_s']:.0%} of the limit, "
          f"HF at {hf_b1['decode_tok_s'] / limit['decode_tok_s']:.0%}")
    print(f"ngram drafts accepted: {spec['batch1']['acceptance_rate']:.0%} at batch 1, "
          f"{spec['concurrent']['acceptance_rate']:.0%} at {args.num_requests} requests "
          f"(the limit row is for plain decoding: speculation verifies several tokens per weight pass)")
    cpu_ops = build_op_set("cpu")
    peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result = {"date": dt.date.today().isoformat(), "machine": cpu_model_name(),
              "num_threads": torch.get_num_threads(), "model": args.model, "dtype": "float32",
              "prompt_len": args.prompt_len, "output_len": args.output_len,
              "num_requests": args.num_requests, "kv_cache_memory_gb": args.kv_cache_memory_gb,
              "hf_batch1": hf_b1, "ours_batch1": ours_b1,
              "ours_concurrent": ours_batch, "ours_batch1_multi_prompt": ours_b1_prompts,
              "ours_ngram_speculation": spec,
              "ratio_batch1_ngram_vs_hf": spec["batch1"]["decode_tok_s"] / hf_rate,
              "ratio_concurrent_ngram_vs_hf_batch1": spec["concurrent"]["tok_s"] / hf_rate,
              "ratio_batch1_vs_hf": ours_b1["decode_tok_s"] / hf_b1["decode_tok_s"],
              "ratio_concurrent_vs_hf_batch1": ours_batch["tok_s"] / hf_b1["decode_tok_s"],
              "batch1_limit": limit,
              "ratio_batch1_vs_limit": ours_b1["decode_tok_s"] / limit["decode_tok_s"],
              "ratio_hf_batch1_vs_limit": hf_b1["decode_tok_s"] / limit["decode_tok_s"],
              "cpu_linear_kernel": cpu_ops.select("linear", dtype=torch.float32).name,
              "cpu_linear_choice": linear_choice(),
              "cpu_kernels": {op: cpu_ops.select(op).name for op in _SMALL_OPS},
              "disabled_kernels": os.environ.get("ASCEND_LLM_DISABLE_KERNELS", ""),
              "peak_rss_gib_whole_benchmark": peak_rss_gib}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "" if linear_choice() == "auto" else f"_{linear_choice()}"      # ASCEND_LLM_CPU_LINEAR runs
    if result["disabled_kernels"]:
        suffix += "_kernels_disabled"
    path = out_dir / f"offline_cpu_{result['date']}_{machine_slug(result['machine'])}{suffix}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
