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
from ascend_llm.eval.accuracy_guard import (generic_prompts, reference_from_engine, reference_from_logprobs,
                                            verify)
from ascend_llm.eval.accuracy_reference import (FILE_NAME, MIN_PROMPT_TOKENS, AccuracyReference,
                                                AccuracyReferenceError, load_reference, reference_path)
from calib.dataset import load_calib_texts

logger = logging.getLogger("calib")

TOP_K = 8
PROMPT_TOKENS = 48
NUM_HELDOUT = 4
NUM_PROMPTS = 6           # held-out texts first, generic ones fill up (at least 2)
_CPU = dict(device="cpu", enforce_eager=True, kv_cache_memory_gb=0.05)


def heldout_texts(calib_file: str | None, num_used: int | None) -> list[str]:
    """The calibration file's texts after the first `num_used` (the ones calibrated on); none
    when there is no file or every text was used."""
    if not calib_file or num_used is None:
        return []
    return load_calib_texts(calib_file, num_used + NUM_HELDOUT)[num_used:]


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
    prompts = _prompts(tokenizer, heldout_texts, getattr(model.config, "vocab_size", None))
    device = next(model.parameters()).device
    logprobs = [model(torch.tensor([ids], device=device)).logits[0].float().log_softmax(-1).cpu()
                for _, _, ids in prompts]
    return reference_from_logprobs(prompts, logprobs, TOP_K, {"tool": tool, "version": __version__},
                                   source_model)


def float_reference_from_checkpoint(model_dir: str | Path, heldout_texts: list[str], tool: str
                                    ) -> AccuracyReference:
    """The same from a float checkpoint this tool never loads as a torch model (the WINT2 writer
    streams tensors): the runtime scores it on CPU through its prompt logprobs."""
    from ascend_llm import LLM
    with LLM(str(model_dir), **_CPU) as llm:
        engine = llm.llm_engine
        prompts = _prompts(engine.tokenizer, heldout_texts, engine.vocab_size)
        return reference_from_engine(engine, prompts, TOP_K, {"tool": tool, "version": __version__},
                                     str(model_dir))


def _prompts(tokenizer: Any, heldout_texts: list[str], vocab_size: int | None) -> list[tuple[str, str, list[int]]]:
    heldout = heldout_prompts(tokenizer, heldout_texts)
    generic = generic_prompts(tokenizer, PROMPT_TOKENS, vocab_size)
    prompts = heldout + generic[:max(2, NUM_PROMPTS - len(heldout))]
    if not prompts:
        raise ValueError("accuracy reference: no prompt of at least 8 tokens")
    return prompts


def record_and_write(reference: AccuracyReference, checkpoint_dir: str | Path, **llm_kwargs: Any) -> Path:
    """Store the written checkpoint's own scores as `at_conversion` and write the file."""
    reference.at_conversion = measure_at_conversion(reference, checkpoint_dir, **llm_kwargs)
    return reference.write(checkpoint_dir)


def measure_at_conversion(reference: AccuracyReference, checkpoint_dir: str | Path,
                          **llm_kwargs: Any) -> dict[str, Any] | None:
    """Load the checkpoint on CPU and score it; None (the reason logged) when this runtime cannot
    load it there: the float reference is still worth shipping."""
    from ascend_llm import LLM
    try:
        with LLM(str(checkpoint_dir), **dict(_CPU, **llm_kwargs)) as llm:
            report = verify(llm.llm_engine, reference, max_kl=float("inf"), min_top1=0.0)
    except Exception as exc:
        logger.warning("accuracy reference: could not score the written checkpoint on CPU (%s); "
                       "at_conversion left null", exc)
        return None
    scores = {k: round(v, 6) for k, v in report.scores.to_dict().items() if isinstance(v, float)}
    return {**scores, "num_positions": report.scores.num_positions, "backend": report.backend,
            "note": "measured by the writing tool right after conversion"}


def carry_over(src_dir: str | Path, checkpoint_dir: str | Path, tool: str) -> str:
    """For a converter (no float model at hand): keep the source checkpoint's reference (the
    float answers do not change with the storage format), re-measure `at_conversion` on the
    converted checkpoint, and keep the source's numbers as `source_at_conversion`. Returns the
    line for the tool's report."""
    target = Path(checkpoint_dir) / FILE_NAME
    if not reference_path(src_dir).is_file():
        target.unlink(missing_ok=True)
        return (f"none: the source has no {FILE_NAME} and the converter has no float model "
                f"(check the output with `ascend-llm verify DST --reference FLOAT_MODEL`)")
    try:
        reference = load_reference(src_dir)
    except AccuracyReferenceError as exc:
        target.unlink(missing_ok=True)
        logger.warning("accuracy reference not carried over: %s", exc)
        return f"none: the source's is malformed ({exc})"
    reference.extra["source_at_conversion"] = reference.at_conversion
    reference.writer = dict(reference.writer, carried_by=tool)
    record_and_write(reference, checkpoint_dir)
    measured = "re-measured on the converted checkpoint" if reference.at_conversion else "not measurable on CPU"
    return f"carried over from the source; at_conversion {measured}"

