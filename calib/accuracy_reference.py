"""Write `accuracy_reference.json` (format: ascend_llm/eval/accuracy_reference.py) into a
quantizing tool's output: the float model's top-k log-probs on held-out calibration texts plus
a few generic ones, and the written checkpoint's own scores, measured by loading it with the
runtime on CPU right after conversion (ascend_llm/eval/accuracy_guard.py defines the numbers).

Two steps, because the float model is often changed in place (smoothing folds scales into the
norms) before the checkpoint exists: `float_reference` while the model is still float, then
`record_and_write` once the checkpoint's files are in place.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ascend_llm import __version__
from ascend_llm.eval.accuracy_guard import (generic_prompts, reference_from_logprobs, verify)
from ascend_llm.eval.accuracy_reference import MIN_PROMPT_TOKENS, AccuracyReference

logger = logging.getLogger("calib")

TOP_K = 8
PROMPT_TOKENS = 48
NUM_HELDOUT = 4
NUM_GENERIC = 2


def heldout_prompts(tokenizer: Any, texts: list[str], max_tokens: int = PROMPT_TOKENS
                    ) -> list[tuple[str, str, list[int]]]:
    """(name, source, ids) of up to NUM_HELDOUT texts the calibration did not see."""
    prompts = []
    for text in texts:
        ids = list(tokenizer(text)["input_ids"])[:max_tokens]
        if len(ids) >= MIN_PROMPT_TOKENS:
            prompts.append((f"heldout-{len(prompts)}", "calibration-heldout", ids))
        if len(prompts) == NUM_HELDOUT:
            break
    return prompts


@torch.no_grad()
def float_reference(model: torch.nn.Module, tokenizer: Any, heldout_texts: list[str], tool: str,
                    source_model: str) -> AccuracyReference:
    """Score the prompts with the (still float) HF model: one forward per prompt, fp32 log-softmax."""
    prompts = heldout_prompts(tokenizer, heldout_texts) + generic_prompts(tokenizer, PROMPT_TOKENS)[:NUM_GENERIC]
    if not prompts:
        raise ValueError("accuracy reference: no prompt of at least 8 tokens")
    device = next(model.parameters()).device
    logprobs = [model(torch.tensor([ids], device=device)).logits[0].float().log_softmax(-1).cpu()
                for _, _, ids in prompts]
    return reference_from_logprobs(prompts, logprobs, TOP_K, {"tool": tool, "version": __version__},
                                   source_model)


def record_and_write(reference: AccuracyReference, checkpoint_dir: str | Path, **llm_kwargs: Any) -> Path:
    """Load the written checkpoint on CPU, store its scores as `at_conversion`, write the file.
    A checkpoint this runtime cannot load on CPU still gets the float reference (at_conversion
    null, with the reason logged)."""
    from ascend_llm import LLM
    options = dict(device="cpu", enforce_eager=True, kv_cache_memory_gb=0.05, **llm_kwargs)
    try:
        llm = LLM(str(checkpoint_dir), **options)
        try:
            report = verify(llm.llm_engine, reference, max_kl=float("inf"), min_top1=0.0)
        finally:
            llm.shutdown()
        reference.at_conversion = {**{k: round(v, 6) for k, v in report.scores.to_dict().items()
                                      if isinstance(v, float)},
                                   "num_positions": report.scores.num_positions, "backend": report.backend,
                                   "note": "measured by the writing tool right after conversion"}
    except Exception as exc:      # the float reference is still worth shipping
        logger.warning("accuracy reference: could not score the written checkpoint on CPU (%s); "
                       "at_conversion left null", exc)
        reference.at_conversion = None
    return reference.write(checkpoint_dir)
