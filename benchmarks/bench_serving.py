"""Online serving benchmark against a running `ascend-llm serve` (async streaming client).

For each concurrency level it sends `--num-prompts` streamed /v1/completions requests
(fixed-length real-text token-id prompts, `ignore_eos`, greedy) with at most that many
in flight, and reports request throughput, output tokens/s, and TTFT / TPOT / ITL / E2E
percentiles (vLLM definitions). `--compare-offline` then runs the same workload through
the offline `LLM` in this process (run it while the server is idle) and reports the ratio.

    ascend-llm serve &                       # bundled SmolLM2 on 127.0.0.1:8000
    python benchmarks/bench_serving.py --concurrency 1,4,16 --compare-offline
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

logger = logging.getLogger("bench_serving")

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "eval_tempest.txt"
PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    """Client-side timings of one streamed request (seconds)."""
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def make_prompts(model: str, num: int, prompt_len: int) -> list[list[int]]:
    """`num` different windows of real text, each exactly `prompt_len` tokens."""
    from transformers import AutoTokenizer

    from ascend_llm.loader import resolve_model_path
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model))
    text = DATA.read_text() if DATA.exists() else "The quick brown fox jumps over the lazy dog. " * 2000
    ids = tokenizer.encode(text, add_special_tokens=False)
    stride = max(1, (len(ids) - prompt_len) // max(1, num))
    return [ids[i * stride: i * stride + prompt_len] for i in range(num)]


async def one_request(client: httpx.AsyncClient, model: str, prompt: list[int], output_len: int) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    last, result = start, RequestResult(ok=False)
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                return RequestResult(ok=False, error=f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if not chunk.get("choices"):
                    continue
                now = time.perf_counter()
                if result.ttft == 0.0:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
    except httpx.HTTPError as exc:
        return RequestResult(ok=False, error=repr(exc))
    result.e2e = time.perf_counter() - start
    result.ok = result.output_tokens > 0
    return result


async def run_level(base_url: str, api_key: str | None, model: str, prompts: list[list[int]],
                    output_len: int, concurrency: int) -> tuple[list[RequestResult], float]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=600) as client:
        async def limited(prompt: list[int]) -> RequestResult:
            async with gate:
                return await one_request(client, model, prompt, output_len)
        start = time.perf_counter()
        results = await asyncio.gather(*(limited(p) for p in prompts))
        return list(results), time.perf_counter() - start


def _pcts(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    stats = {"mean_ms": statistics.fmean(ordered) * 1e3}
    for p in PERCENTILES:
        stats[f"p{p}_ms"] = ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))] * 1e3
    return stats


def summarize(results: list[RequestResult], duration: float, concurrency: int) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {"concurrency": concurrency, "completed": len(ok), "failed": len(results) - len(ok),
            "errors": sorted({r.error for r in results if not r.ok})[:3], "duration_s": duration,
            "request_throughput": len(ok) / duration, "output_tok_s": out_tokens / duration,
            "ttft": _pcts([r.ttft for r in ok]), "tpot": _pcts(tpot),
            "itl": _pcts([g for r in ok for g in r.itl]), "e2el": _pcts([r.e2e for r in ok])}


def offline_throughput(model: str, prompts: list[list[int]], output_len: int, max_num_seqs: int,
                       max_model_len: int) -> float:
    """Output tokens/s of the offline engine for the same prompts (all submitted at once)."""
    from ascend_llm import LLM, SamplingParams
    llm = LLM(model, max_model_len=max_model_len, max_num_seqs=max_num_seqs)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompt_token_ids=prompts[:2], sampling_params=SamplingParams(max_tokens=4), use_tqdm=False)
    start = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start)


def _print_row(s: dict) -> None:
    print(f"{s['concurrency']:>4} {s['completed']:>5} {s['request_throughput']:>8.2f} {s['output_tok_s']:>9.1f} "
          f"{s['ttft'].get('p50_ms', 0):>9.0f} {s['ttft'].get('p99_ms', 0):>9.0f} "
          f"{s['tpot'].get('p50_ms', 0):>9.1f} {s['itl'].get('p50_ms', 0):>8.1f} {s['itl'].get('p99_ms', 0):>8.1f}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="served model name (and tokenizer)")
    parser.add_argument("--tokenizer-model", default=None, help="model dir/alias for the tokenizer (default --model)")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated levels")
    parser.add_argument("--num-prompts", type=int, default=None, help="per level (default 2 x concurrency, >= 8)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--compare-offline", action="store_true",
                        help="also run the offline engine on the highest level's workload and report the ratio")
    parser.add_argument("--max-model-len", type=int, default=2048, help="offline engine only")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    levels = [int(c) for c in args.concurrency.split(",")]
    most = max(max(8, 2 * c) if args.num_prompts is None else args.num_prompts for c in levels)
    prompts = make_prompts(args.tokenizer_model or args.model, most, args.prompt_len)
    asyncio.run(run_level(args.base_url, args.api_key, args.model, prompts[:2], 4, 2))   # warm-up
    print(f"{'conc':>4} {'done':>5} {'req/s':>8} {'out tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'TPOT p50':>9} {'ITL p50':>8} {'ITL p99':>8}   (ms)")
    summaries = []
    for c in levels:
        n = args.num_prompts or max(8, 2 * c)
        results, duration = asyncio.run(run_level(args.base_url, args.api_key, args.model, prompts[:n],
                                                  args.output_len, c))
        summaries.append(summarize(results, duration, c))
        _print_row(summaries[-1])
    report = {"date": dt.datetime.now().isoformat(timespec="seconds"), "base_url": args.base_url,
              "model": args.model, "prompt_len": args.prompt_len, "output_len": args.output_len,
              "levels": summaries}
    if args.compare_offline:
        top = max(summaries, key=lambda s: s["concurrency"])
        n = args.num_prompts or max(8, 2 * top["concurrency"])
        rate = offline_throughput(args.tokenizer_model or args.model, prompts[:n], args.output_len,
                                  top["concurrency"], args.max_model_len)
        report["offline_output_tok_s"] = rate
        report["serving_vs_offline"] = top["output_tok_s"] / rate
        print(f"offline engine: {rate:.1f} out tok/s; serving at concurrency {top['concurrency']}: "
              f"{top['output_tok_s']:.1f} ({100 * report['serving_vs_offline']:.0f}% of offline)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"serving_{dt.date.today().isoformat()}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"written {path}")


if __name__ == "__main__":
    main()
