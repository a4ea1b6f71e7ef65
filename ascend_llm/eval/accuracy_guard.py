"""Replay an accuracy reference (accuracy_reference.py) on a loaded engine and score the
quantized model against the float model's recorded answers.

What is computed, per scored position p of every prompt (token p + 1 predicted from tokens <= p):
- P: the float model's top-k log-probs (from the file), S their ids; the tail T = 1 - sum_S P
  lumped into one bucket (clamped at 0).
- Q: the quantized model's log-probs of the ids in S, read from the engine's prompt logprobs
  (each position returns the real next token plus the quantized top MAX_LOGPROBS = 20). An id of
  S outside the quantized top 20 gets the 20th log-prob, an upper bound, so the KL of such a
  position is a lower bound; `num_unresolved` counts those ids. Q(T) = 1 - sum_S Q, floored 1e-10.
- KL = sum over S and T of P log(P / Q) (nats); `mean_kl` averages it over all positions.
- top-1 agreement: share of positions where the quantized argmax is the float argmax (S[0]).
- perplexity: exp(mean -log Q(real next token)); `ppl_ratio` = perplexity / the float one.
No backend branch: the prompt logprobs come through the scheduler and model runner like any
request's, on whatever backend the engine runs.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ascend_llm.eval.accuracy_reference import (AccuracyReference, AccuracyReferenceError,
                                                ReferencePrompt)
from ascend_llm.sampling_params import MAX_LOGPROBS, SamplingParams

if TYPE_CHECKING:
    from ascend_llm.engine.llm_engine import LLMEngine

# Defaults of `verify` / `serve --verify-accuracy`, from SmolLM2-135M-Instruct on CPU (python -m
# calib, 8 x 128 calibration tokens; 254 positions, 2026-12-07):
#   W8A16                       KL 0.0027  top-1 0.94  ppl ratio 1.005
#   W8A8_DYNAMIC                KL 0.035   top-1 0.82  ppl ratio 1.05
#   W8A8 static min-max         KL 0.73    top-1 0.44  ppl ratio 2.13   (known bad: ppl 57 vs 28)
#   W8A8_DYNAMIC, layers.5.mlp.down_proj weight_scale x4
#                               KL 1.01    top-1 0.44  ppl ratio 3.30
# Bigger models agree more (a 135M model is the hard case), so the thresholds sit ~5x above good
# KL and halfway between good and broken agreement.
DEFAULT_MAX_KL = 0.2
DEFAULT_MIN_TOP1 = 0.7
GENERIC_TEXTS = (
    "The quick brown fox jumps over the lazy dog. Meanwhile, the farmer counts his sheep and "
    "wonders whether the rain will come before the harvest is finished.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "Water boils at 100 degrees Celsius at sea level. At higher altitudes the air pressure is "
    "lower, so water boils at a lower temperature and food takes longer to cook.",
    "Question: What is 12 times 7? Answer: 12 times 7 is 84. Question: What is 9 plus 15? "
    "Answer: 9 plus 15 is 24.",
)
_TAIL_FLOOR = 1e-10


@dataclass(slots=True)
class AccuracyScores:
    """The quantized model's numbers against the float reference (module docstring)."""
    mean_kl: float
    top1_agreement: float
    perplexity: float
    ppl_ratio: float
    num_positions: int
    num_unresolved: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class AccuracyReport:
    """Replayed scores, the ones recorded at conversion, and the thresholds they passed or not."""
    scores: AccuracyScores
    at_conversion: dict[str, Any] | None
    max_kl: float
    min_top1: float
    backend: str = ""
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def reason(self) -> str:
        return "; ".join(self.failures) if self.failures else "ok"

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "backend": self.backend, "replayed": self.scores.to_dict(),
                "at_conversion": self.at_conversion, "thresholds": {"max_kl": self.max_kl, "min_top1": self.min_top1},
                "failures": self.failures}

    def text(self) -> str:
        s, conv = self.scores, self.at_conversion or {}
        lines = [f"{'metric':<16}{'replayed':>12}{'at conversion':>16}{'threshold':>12}"]
        for key, value, limit in (("mean_kl", s.mean_kl, f"<= {self.max_kl:g}"),
                                  ("top1_agreement", s.top1_agreement, f">= {self.min_top1:g}"),
                                  ("ppl_ratio", s.ppl_ratio, ""), ("perplexity", s.perplexity, "")):
            recorded = conv.get(key)
            shown = "-" if recorded is None else f"{recorded:.4f}"
            lines.append(f"{key:<16}{value:>12.4f}{shown:>16}{limit:>12}")
        lines.append(f"{s.num_positions} positions on {self.backend or 'this backend'}"
                     + (f", {s.num_unresolved} float top-k ids outside the quantized top {MAX_LOGPROBS}"
                        if s.num_unresolved else ""))
        lines.append("PASS" if self.ok else f"FAIL: {self.reason()}")
        return "\n".join(lines)


def replay(engine: "LLMEngine", prompts: list[list[int]]) -> list[list[dict[int, float]]]:
    """Per prompt, per scored position p: {token id: log-prob} of the real next token and the
    engine's top MAX_LOGPROBS, from one prefill of each prompt (prompt_logprobs)."""
    vocab = engine.vocab_size
    for i, ids in enumerate(prompts):
        if max(ids) >= vocab:
            raise AccuracyReferenceError(f"prompts[{i}]: token id {max(ids)} is outside this model's vocabulary "
                                         f"({vocab}); the reference was written for another model")
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=MAX_LOGPROBS, detokenize=False)
    request_ids = [f"accuracy-guard-{i}" for i in range(len(prompts))]
    for request_id, ids in zip(request_ids, prompts):
        engine.add_request(request_id, None, params, prompt_token_ids=list(ids))
    finished: dict[str, Any] = {}
    while len(finished) < len(prompts):
        for out in engine.step():
            if out.finished and out.request_id in request_ids:
                if not out.prompt_logprobs:
                    raise RuntimeError(f"accuracy replay: request {out.request_id} finished without prompt logprobs")
                finished[out.request_id] = out
    return [[{tid: lp.logprob for tid, lp in entry.items()} for entry in finished[r].prompt_logprobs[1:]]
            for r in request_ids]


def score(reference: AccuracyReference, replayed: list[list[dict[int, float]]]) -> AccuracyScores:
    """The module docstring's numbers from `replay`'s output for `reference.prompts`."""
    total_kl, agree, nll, positions, unresolved = 0.0, 0, 0.0, 0, 0
    for prompt, rows in zip(reference.prompts, replayed):
        for p, q_row in enumerate(rows):
            kl, missing = _position_kl(prompt.top_ids[p], prompt.top_logprobs[p], q_row)
            total_kl += kl
            unresolved += missing
            agree += max(q_row, key=q_row.__getitem__) == prompt.top_ids[p][0]
            nll -= q_row[prompt.token_ids[p + 1]]
            positions += 1
    ppl = math.exp(nll / positions)
    return AccuracyScores(total_kl / positions, agree / positions, ppl, ppl / reference.float_perplexity,
                          positions, unresolved)


def _position_kl(top_ids: list[int], top_logprobs: list[float], q_row: dict[int, float]) -> tuple[float, int]:
    ranked = sorted(q_row.values(), reverse=True)            # the top 20, maybe plus the real token
    floor_lp = ranked[min(len(ranked), MAX_LOGPROBS) - 1]     # the 20th: bounds every id not returned
    p = [math.exp(v) for v in top_logprobs]
    q = [math.exp(q_row.get(t, floor_lp)) for t in top_ids]
    missing = sum(t not in q_row for t in top_ids)
    p_tail, q_tail = max(1.0 - sum(p), 0.0), max(1.0 - sum(q), _TAIL_FLOOR)
    kl = sum(pi * math.log(pi / max(qi, _TAIL_FLOOR)) for pi, qi in zip(p, q) if pi > 0)
    if p_tail > 0:
        kl += p_tail * math.log(p_tail / q_tail)
    return max(kl, 0.0), missing


def verify(engine: "LLMEngine", reference: AccuracyReference, max_kl: float = DEFAULT_MAX_KL,
           min_top1: float = DEFAULT_MIN_TOP1) -> AccuracyReport:
    """Replay `reference` on `engine` and judge the scores against the thresholds."""
    scores = score(reference, replay(engine, [p.token_ids for p in reference.prompts]))
    report = AccuracyReport(scores, reference.at_conversion, max_kl, min_top1, str(getattr(engine, "backend", "")))
    if not scores.mean_kl <= max_kl:
        report.failures.append(f"mean KL(float || quantized) {scores.mean_kl:.4f} > {max_kl:g}")
    if not scores.top1_agreement >= min_top1:
        report.failures.append(f"top-1 agreement {scores.top1_agreement:.3f} < {min_top1:g}")
    return report


def reference_from_logprobs(prompts: list[tuple[str, str, list[int]]], logprobs: list[torch.Tensor],
                            top_k: int, writer: dict[str, str], source_model: str) -> AccuracyReference:
    """Build a reference from the float model's log-softmax rows, one [len, vocab] tensor per
    prompt (row p: the distribution after token_ids[:p + 1]; the last row is unused)."""
    refs, nll, count = [], 0.0, 0
    for (name, source, ids), lp in zip(prompts, logprobs):
        lp = lp[:len(ids) - 1].float()                                   # [len - 1, vocab]
        top_lps, top_ids = lp.topk(top_k, dim=-1)
        nll -= lp.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).sum().item()
        count += len(ids) - 1
        refs.append(ReferencePrompt(name, source, list(ids), top_ids.tolist(), top_lps.tolist()))
    return AccuracyReference(writer, source_model, top_k, refs, math.exp(nll / count), count)


def reference_from_engine(engine: "LLMEngine", prompts: list[tuple[str, str, list[int]]], top_k: int,
                          writer: dict[str, str], source_model: str) -> AccuracyReference:
    """The same from a float model loaded in this runtime (`verify --reference FLOAT_MODEL`)."""
    if top_k > MAX_LOGPROBS:
        raise ValueError(f"top_k: at most {MAX_LOGPROBS}, got {top_k}")
    replayed = replay(engine, [ids for _, _, ids in prompts])
    refs, nll, count = [], 0.0, 0
    for (name, source, ids), rows in zip(prompts, replayed):
        top_ids, top_lps = [], []
        for p, row in enumerate(rows):
            best = sorted(row.items(), key=lambda kv: -kv[1])[:top_k]
            top_ids.append([t for t, _ in best])
            top_lps.append([v for _, v in best])
            nll -= row[ids[p + 1]]
            count += 1
        refs.append(ReferencePrompt(name, source, list(ids), top_ids, top_lps))
    return AccuracyReference(writer, source_model, top_k, refs, math.exp(nll / count), count)


def generic_prompts(tokenizer: Any, max_tokens: int = 48, vocab_size: int | None = None
                    ) -> list[tuple[str, str, list[int]]]:
    """GENERIC_TEXTS tokenized (the fixed token set of `verify --reference` and the writers); ids
    past `vocab_size` (a tokenizer larger than the model's embedding) are dropped."""
    prompts = []
    for i, text in enumerate(GENERIC_TEXTS):
        ids = [t for t in tokenizer(text)["input_ids"] if vocab_size is None or t < vocab_size][:max_tokens]
        if len(ids) >= 8:
            prompts.append((f"generic-{i}", "generic", ids))
    return prompts
