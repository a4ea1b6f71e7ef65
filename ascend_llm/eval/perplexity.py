"""Perplexity of a model on a text, scored through the engine's prompt logprobs."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ascend_llm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from ascend_llm.llm import LLM


@dataclass(frozen=True, slots=True)
class PerplexityResult:
    """exp(mean negative log-likelihood) over `num_scored` tokens in `num_windows` windows."""
    perplexity: float
    mean_nll: float
    num_scored: int
    num_windows: int


def split_windows(token_ids: list[int], window: int) -> list[list[int]]:
    """Non-overlapping windows of `window` tokens (the last may be shorter, >= 2 tokens)."""
    if window < 2:
        raise ValueError(f"window: must be >= 2 tokens, got {window}")
    windows = [token_ids[i:i + window] for i in range(0, len(token_ids), window)]
    return [w for w in windows if len(w) >= 2]


def perplexity(llm: "LLM", token_ids: list[int], window: int) -> PerplexityResult:
    """Score every window independently; token i of a window is predicted from tokens < i."""
    windows = split_windows(token_ids, window)
    if not windows:
        raise ValueError("text: fewer than 2 tokens to score")
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    outputs = llm.generate(prompt_token_ids=windows, sampling_params=params, use_tqdm=False)
    total, count = 0.0, 0
    for ids, out in zip(windows, outputs):
        for token, entry in zip(ids[1:], out.prompt_logprobs[1:]):
            total -= entry[token].logprob
            count += 1
    mean_nll = total / count
    return PerplexityResult(math.exp(mean_nll), mean_nll, count, len(windows))
