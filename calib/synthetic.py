"""Calibration texts sampled from the float model itself (data-free distillation data).

    python -m calib.synthetic --model FLOAT --output gen.jsonl \
        [--num_texts 128 --max_tokens 512 --temperature 1.0 --seed 0 --prefix_file calib.jsonl] [--overwrite]

Distillation tuning (calib/wint2/tune.py) fits the quantized model to the float model's
next-token distributions on the calibration rows. A small calibration file from one domain gets
fitted too well: the tuned model is close to float on that prose and further away elsewhere. The
float model can write as much text as wanted from its own distribution, which is the distribution
the quantized model has to imitate (the LLM-QAT recipe): each text starts from a few tokens and
is sampled at temperature 1 over the whole vocabulary, with EOS held back until --max_tokens
(SamplingParams.min_tokens), so every text is a full row.

Starts: without --prefix_file, one random non-special vocabulary token per text (seeded); with
it, the first --prefix_tokens tokens of each calibration text in turn. The output is JSON lines
with key "text" (start included), readable by every --calib_file. An existing --output is
refused without --overwrite (checked before any sampling); the file is written beside the target
under a temporary name and renamed at the end (calib/output_dir.write_jsonl), so a failed run
leaves the previous file, or none, never a truncated one.
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from calib.output_dir import check_output_file, write_jsonl
from calib.texts import read_calib_texts

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SyntheticSpec:
    """How many texts, how long, and how they are sampled."""
    num_texts: int = 128
    max_tokens: int = 512
    temperature: float = 1.0
    seed: int = 0
    prefix_tokens: int = 4

    def __post_init__(self) -> None:
        if self.num_texts < 1 or self.max_tokens < 1 or self.prefix_tokens < 1:
            raise ValueError(f"synthetic_calib: num_texts, max_tokens and prefix_tokens must be >= 1, got "
                             f"{self.num_texts}, {self.max_tokens}, {self.prefix_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"synthetic_calib: temperature must be a positive number, got {self.temperature}")


def random_starts(tokenizer, num: int, seed: int) -> list[list[int]]:
    """One uniformly drawn non-special token id per text."""
    special = set(tokenizer.all_special_ids)
    candidates = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    picks = torch.randint(len(candidates), (num,), generator=torch.Generator().manual_seed(seed))
    return [[int(candidates[i])] for i in picks]


def prefix_starts(tokenizer, texts: list[str], num: int, prefix_tokens: int) -> list[list[int]]:
    """The first `prefix_tokens` tokens of the texts, cycling through them."""
    prefixes = [ids[:prefix_tokens] for ids in (tokenizer.encode(t, add_special_tokens=False) for t in texts) if ids]
    if not prefixes:
        raise ValueError("--prefix_file: no text gives a token")
    return [prefixes[i % len(prefixes)] for i in range(num)]


def sample_token_ids(llm, starts: list[list[int]], spec: SyntheticSpec) -> list[list[int]]:
    """Sample `spec.max_tokens` tokens after every start (module doc); start + sampled ids per text.
    Text i is sampled with seed spec.seed + i, so the output does not depend on batching."""
    from ascend_llm.sampling_params import SamplingParams

    params = [SamplingParams(temperature=spec.temperature, top_p=1.0, top_k=-1, seed=spec.seed + i,
                             max_tokens=spec.max_tokens, min_tokens=spec.max_tokens)
              for i in range(len(starts))]
    outputs = llm.generate(prompt_token_ids=starts, sampling_params=params)
    return [start + list(out.outputs[0].token_ids) for start, out in zip(starts, outputs)]


def write_synthetic_calib(model: str, output: str | Path, spec: SyntheticSpec = SyntheticSpec(),
                          prefix_file: str | None = None, overwrite: bool = False, **engine_kwargs) -> list[str]:
    """Generate the texts (module doc) with our engine on `model` and write them as JSON lines
    (atomically; an existing `output` is refused with CalibError unless `overwrite`)."""
    from ascend_llm import LLM

    output = check_output_file(output, overwrite)
    start_time = time.perf_counter()
    engine_kwargs.setdefault("max_model_len", spec.max_tokens + spec.prefix_tokens + 1)
    if "max_num_seqs" in engine_kwargs:   # a cache that holds every running text: no preemption
        blocks = -(-engine_kwargs["max_model_len"] // engine_kwargs.get("block_size", 16))
        engine_kwargs.setdefault("num_gpu_blocks_override", engine_kwargs["max_num_seqs"] * blocks)
    with LLM(model, **engine_kwargs) as llm:
        tokenizer = llm.get_tokenizer()
        starts = (prefix_starts(tokenizer, read_calib_texts(prefix_file), spec.num_texts, spec.prefix_tokens)
                  if prefix_file else random_starts(tokenizer, spec.num_texts, spec.seed))
        texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in sample_token_ids(llm, starts, spec)]
    write_jsonl(output, ({"text": text} for text in texts))
    logger.info("synthetic_calib: %d texts of %d tokens in %.0f s -> %s", len(texts), spec.max_tokens,
                time.perf_counter() - start_time, output)
    return texts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m calib.synthetic",
                                     description="write calibration texts sampled from the float model")
    defaults = SyntheticSpec()
    parser.add_argument("--model", required=True, help="the float checkpoint (directory, GGUF or alias)")
    parser.add_argument("--output", required=True, help="JSON lines file to write (key text)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument("--num_texts", type=int, default=defaults.num_texts)
    parser.add_argument("--max_tokens", type=int, default=defaults.max_tokens, help="sampled tokens per text")
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--prefix_file", default=None,
                        help="start each text with the first --prefix_tokens tokens of these texts "
                             "(default: one random vocabulary token)")
    parser.add_argument("--prefix_tokens", type=int, default=defaults.prefix_tokens)
    parser.add_argument("--max_num_seqs", type=int, default=32)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        spec = SyntheticSpec(args.num_texts, args.max_tokens, args.temperature, args.seed, args.prefix_tokens)
        write_synthetic_calib(args.model, args.output, spec, args.prefix_file, overwrite=args.overwrite,
                              max_num_seqs=args.max_num_seqs)
    except (ValueError, OSError) as exc:       # CalibError is a ValueError: one line, exit 2
        parser.error(str(exc))


if __name__ == "__main__":
    main()
