"""Peak resident memory of an `ascend-llm serve` process under load.

Starts the server on 127.0.0.1, sends `--num-requests` concurrent completions
(`--prompt-len` token-id prompts of real text, `--output-len` new tokens each), then
reads the process's peak RSS (VmHWM) and compares it with the budget. Writes JSON under
benchmarks/results/.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from server_probe import proc_status, wait_healthy     # benchmarks/ is on sys.path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "eval_tempest.txt"


async def load(base: str, model: str, prompts: list[str], output_len: int) -> int:
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(prompt: str) -> int:
            body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0,
                    "ignore_eos": True}
            r = await client.post(f"{base}/v1/completions", json=body)
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]
        return sum(await asyncio.gather(*(one(p) for p in prompts)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--port", type=int, default=8077)
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128, help="approximate, in words of real text")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--budget-gib", type=float, default=1.5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args, server_args = parser.parse_known_args()   # anything else goes to the server
    base = f"http://127.0.0.1:{args.port}"
    proc = subprocess.Popen([sys.executable, "-m", "ascend_llm.server.api_server", "--model", args.model,
                             "--host", "127.0.0.1", "--port", str(args.port), *server_args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(base, proc, timeout=600)
        idle = proc_status(proc.pid)
        words = (DATA.read_text() if DATA.exists() else "Full fathom five thy father lies. " * 3000).split()
        prompts = [" ".join(words[i * 200: i * 200 + args.prompt_len]) for i in range(args.num_requests)]
        t0 = time.perf_counter()
        tokens = asyncio.run(load(base, args.model, prompts, args.output_len))
        seconds = time.perf_counter() - t0
        loaded = proc_status(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    peak_gib = loaded["VmHWM"] / 2**20
    print(f"\n{'measure':<36} {'value':>10}")
    print(f"{'idle RSS after start-up (GiB)':<36} {idle['VmRSS'] / 2**20:10.2f}")
    print(f"{'peak RSS under load (GiB)':<36} {peak_gib:10.2f}")
    print(f"{'budget (GiB)':<36} {args.budget_gib:10.2f}")
    print(f"{'peak / budget':<36} {peak_gib / args.budget_gib:10.2f}")
    print(f"{'output tokens/s during load':<36} {tokens / seconds:10.1f}")
    result = {"date": dt.date.today().isoformat(), "machine": platform.machine(), "cpus": os.cpu_count(),
              "model": args.model, "num_requests": args.num_requests, "output_len": args.output_len,
              "idle_rss_gib": idle["VmRSS"] / 2**20, "peak_rss_gib": peak_gib,
              "budget_gib": args.budget_gib, "output_tok_s": tokens / seconds, "server_args": server_args}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"server_memory_cpu_{result['date']}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
