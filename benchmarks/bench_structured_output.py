"""Structured-output cost: decode tokens/s with and without a JSON schema, measured in the same run.

For each concurrency level (default 1 and 16) the engine decodes the same chat prompts (one per
request, different names) twice per repeat, once unconstrained (`ignore_eos`, `max_tokens`) and
once under a JSON schema (nested object, array, enums, bounded strings); the two alternate so load
drifts on a shared host hit both (after one untimed warm-up run per level: the first batch of a
new size pays one-off kernel set-up). Decode tokens/s counts the tokens generated after every request
of the level has its first token, over the time since then (prefill excluded). The grammar is
compiled before timing (the server compiles it off the engine loop, once per schema). The mask work
alone (xgrammar's bitmask fill and token accept for the level's rows, walked through an example
document, plus the apply_token_bitmask op) is also timed
in isolation and stated as a share of a plain step, which a shared host's load disturbs less than
the end-to-end ratio. Prints a table and writes dated JSON to benchmarks/results/.

    python benchmarks/bench_structured_output.py --concurrency 1,16 --max-tokens 48
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
import xgrammar as xgr
from bench_offline import cpu_model_name, machine_slug

from ascend_llm.engine.arg_utils import EngineArgs
from ascend_llm.engine.llm_engine import LLMEngine
from ascend_llm.ops.cpu_logits import apply_token_bitmask
from ascend_llm.sampling_params import SamplingParams, StructuredOutputsParams

logger = logging.getLogger("bench_structured_output")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "maxItems": 3, "items": {
            "type": "object", "properties": {"kind": {"enum": ["cat", "dog", "fish"]},
                                             "legs": {"type": "integer", "minimum": 0, "maximum": 8}},
            "required": ["kind", "legs"], "additionalProperties": False}},
        "home": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}},
                 "required": ["city"], "additionalProperties": False},
    },
    "required": ["name", "age", "pets", "home"],
    "additionalProperties": False,
}
NAMES = ("Alice", "Bob", "Chen", "Dana", "Emil", "Fatima", "Goran", "Hana", "Ivan", "Jia", "Kofi", "Lena",
         "Mateo", "Nora", "Omar", "Priya")


def prompts(engine: LLMEngine, num: int) -> list[list[int]]:
    tokenizer = engine.tokenizer
    texts = [tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Describe {NAMES[i % len(NAMES)]}, their pets and home city as JSON."}],
        add_generation_prompt=True, tokenize=False) for i in range(num)]
    return [tokenizer.encode(text, add_special_tokens=False) for text in texts]


def decode_rate(engine: LLMEngine, token_prompts: list[list[int]], params: SamplingParams, tag: str) -> dict:
    """Run every prompt to completion; decode tokens/s after the last first token."""
    for i, ids in enumerate(token_prompts):
        engine.add_request(f"{tag}-{i}", None, params, prompt_token_ids=ids)
    counts: dict[str, int] = {}
    decode_start = None
    tokens_at_start = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            counts[out.request_id] = len(out.outputs[0].token_ids)
        if decode_start is None and len(counts) == len(token_prompts) and all(counts.values()):
            decode_start, tokens_at_start = time.perf_counter(), sum(counts.values())
    seconds = time.perf_counter() - decode_start
    decoded = sum(counts.values()) - tokens_at_start
    return {"decode_tokens": decoded, "seconds": seconds, "decode_tok_s": decoded / seconds,
            "mean_output_tokens": sum(counts.values()) / len(counts)}


EXAMPLE = '{"name": "Alice", "age": 30, "pets": [{"kind": "cat", "legs": 4}], "home": {"city": "Paris"}}'


def mask_cost_ms(engine: LLMEngine, spec: StructuredOutputsParams, rows: int) -> dict:
    """Milliseconds per step of the grammar work alone for `rows` sequences, walked through a
    valid document token by token: xgrammar's bitmask fill plus accepting the token (the engine's
    per-step matcher work), and the apply_token_bitmask op on fp32 logits."""
    compiled = engine.structured_output.compile(spec)
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(rows)]
    tokens = engine.tokenizer.encode(EXAMPLE, add_special_tokens=False)
    bitmask = xgr.allocate_token_bitmask(rows, engine.vocab_size)       # [rows, ceil(vocab / 32)] int32
    logits = torch.randn(rows, engine.vocab_size)                       # [rows, vocab]
    indices = torch.arange(rows)
    start = time.perf_counter()
    for token in tokens:
        for row, matcher in enumerate(matchers):
            matcher.fill_next_token_bitmask(bitmask, row)
            if not matcher.accept_token(token):
                raise RuntimeError(f"the example document does not fit the schema at token {token}")
    grammar = (time.perf_counter() - start) / len(tokens)
    start = time.perf_counter()
    for _ in tokens:
        apply_token_bitmask(logits, bitmask, indices)
    apply = (time.perf_counter() - start) / len(tokens)
    return {"grammar_ms": grammar * 1e3, "apply_ms": apply * 1e3}


def run_level(engine: LLMEngine, concurrency: int, max_tokens: int, repeats: int) -> dict:
    token_prompts = prompts(engine, concurrency)
    spec = StructuredOutputsParams(json=SCHEMA)
    engine.compile_grammar(spec)
    # ignore_eos in both: a sequence whose grammar completes before max_tokens still finishes (stop)
    plain = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    schema = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, structured_outputs=spec)
    decode_rate(engine, token_prompts, plain, f"warmup-{concurrency}")   # first sight of this batch's shapes
    runs: dict[str, list[dict]] = {"plain": [], "schema": []}
    order = [("plain", plain), ("schema", schema)]
    for r in range(repeats):
        for name, params in order if r % 2 == 0 else order[::-1]:
            runs[name].append(decode_rate(engine, token_prompts, params, f"{name}-{concurrency}-{r}"))
    best = {name: max(rs, key=lambda x: x["decode_tok_s"]) for name, rs in runs.items()}
    mask = mask_cost_ms(engine, spec, concurrency)
    step_ms = 1e3 * concurrency / best["plain"]["decode_tok_s"]
    mask["share_of_plain_step"] = (mask["grammar_ms"] + mask["apply_ms"]) / step_ms
    return {"concurrency": concurrency, "plain": best["plain"], "schema": best["schema"], "mask": mask,
            "all_plain_tok_s": [x["decode_tok_s"] for x in runs["plain"]],
            "all_schema_tok_s": [x["decode_tok_s"] for x in runs["schema"]],
            "ratio": best["schema"]["decode_tok_s"] / best["plain"]["decode_tok_s"]}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per level; the best is kept")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    return parser.parse_args()


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    load_before = os.getloadavg()
    engine = LLMEngine(EngineArgs(model=args.model, device="cpu", max_model_len=512, max_num_seqs=max(levels),
                                  kv_cache_memory_gb=0.25))
    rows = [run_level(engine, c, args.max_tokens, args.repeats) for c in levels]
    print(f"{'concurrency':>11} | {'plain tok/s':>11} | {'schema tok/s':>12} | {'ratio':>5} | "
          f"{'grammar + apply ms':>20} | {'of a plain step':>15}")
    for row in rows:
        mask = row["mask"]
        print(f"{row['concurrency']:>11} | {row['plain']['decode_tok_s']:>11.1f} | "
              f"{row['schema']['decode_tok_s']:>12.1f} | {row['ratio']:>5.2f} | "
              f"{mask['grammar_ms']:>9.2f} + {mask['apply_ms']:<8.2f} | {mask['share_of_plain_step']:>14.1%}")
    report = {"date": dt.date.today().isoformat(), "machine": cpu_model_name(), "model": args.model,
              "max_tokens": args.max_tokens, "repeats": args.repeats, "num_threads": torch.get_num_threads(),
              "loadavg_before_after": [load_before[0], os.getloadavg()[0]],   # a shared host: other work counts
              "schema": SCHEMA, "levels": rows}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"structured_output_cpu_{report['date']}_{machine_slug(report['machine'])}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
