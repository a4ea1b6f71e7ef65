"""Per-request bookkeeping on the engine side: detokenized text, logprobs, stop strings, metrics."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ascend_llm.engine.sequence import Sequence, SequenceStatus
from ascend_llm.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from ascend_llm.sampling_params import SamplingParams


@dataclass
class SeqOutputState:
    """What one sequence has produced so far, as the user sees it."""
    text: str = ""
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None


@dataclass
class RequestState:
    """A request's sequences and their outputs."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    metrics: RequestMetrics
    outputs: list[SeqOutputState] = field(default_factory=list)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    error: str | None = None          # set when the request failed on its own
    embedding: list[float] | None = None   # return_embedding: set by the step that computes the last prompt token

    def __post_init__(self) -> None:
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]     # the first prompt token has nothing before it
        want_logprobs = self.params.logprobs is not None
        self.outputs = [SeqOutputState(logprobs=[] if want_logprobs else None,
                                       cumulative_logprob=0.0 if want_logprobs else None)
                        for _ in self.seqs]

    @property
    def finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)

    def record_logprobs(self, seq: Sequence, token_id: int, logprobs: dict[int, float] | None,
                        ranks: dict[int, int] | None, tokenizer: Any) -> None:
        state = self.outputs[seq.index]
        if state.logprobs is None or logprobs is None:
            return
        entry = {tid: Logprob(lp, (ranks or {}).get(tid), tokenizer.decode([tid]))
                 for tid, lp in logprobs.items()}
        state.logprobs.append(entry)
        state.cumulative_logprob += logprobs[token_id]

    def record_prompt_logprobs(self, first_pos: int, logprobs: list[dict[int, float]],
                               ranks: list[dict[int, int]], tokenizer: Any) -> None:
        """Append logprobs of prompt positions first_pos...; positions already recorded (a
        recompute after preemption) are skipped."""
        if self.prompt_logprobs is None:
            return
        for offset, (lps, rks) in enumerate(zip(logprobs, ranks)):
            if first_pos + offset == len(self.prompt_logprobs):
                self.prompt_logprobs.append({tid: Logprob(lp, rks.get(tid), tokenizer.decode([tid]))
                                             for tid, lp in lps.items()})

    def update_text(self, seq: Sequence, tokenizer: Any, num_tokens: int | None = None) -> str | None:
        """Re-detokenize seq's output up to its first num_tokens tokens (prompt included; default
        all); returns the stop string that ended it, if any."""
        params = self.params
        if not params.detokenize:
            return None
        output = seq.token_ids[seq.num_prompt_tokens:num_tokens]
        if (not params.skip_special_tokens and not params.include_stop_str_in_output
                and _ended_by_special_token(seq, num_tokens, tokenizer)):
            output = output[:-1]     # the EOS that ended it is not text, even with special tokens kept
        text = tokenizer.decode(output, skip_special_tokens=params.skip_special_tokens)
        stop, cut = _find_stop(text, params.stop, len(self.outputs[seq.index].text))
        if stop is not None:
            text = text[:cut + len(stop)] if params.include_stop_str_in_output else text[:cut]
        self.outputs[seq.index].text = text
        return stop

    def to_output(self) -> RequestOutput:
        if self.finished and self.metrics.finished_time is None:
            self.metrics.finished_time = time.time()
        outs = [CompletionOutput(seq.index, state.text, list(seq.output_token_ids),
                                 state.cumulative_logprob, state.logprobs,
                                 seq.status.finish_reason, seq.stop_reason)
                for seq, state in zip(self.seqs, self.outputs)]
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, self.prompt_logprobs, outs,
                             self.finished, self.metrics,
                             max(seq.num_cached_tokens for seq in self.seqs), self.error, self.embedding)


def _find_stop(text: str, stops: list[str], prev_len: int) -> tuple[str | None, int]:
    """First stop string in text that ends in the newly added part: (stop, index)."""
    best: tuple[str | None, int] = (None, len(text))
    for stop in stops:
        idx = text.find(stop, max(0, prev_len - len(stop) + 1))
        if idx != -1 and idx < best[1]:
            best = (stop, idx)
    return best


def _ended_by_special_token(seq: Sequence, num_tokens: int | None, tokenizer: Any) -> bool:
    """Whether the last of seq's first num_tokens tokens is a special token (EOS, or a special
    stop_token_ids entry) that finished it; such a token is not part of the output text."""
    if seq.status is not SequenceStatus.FINISHED_STOPPED or isinstance(seq.stop_reason, str):
        return False
    if num_tokens is not None and num_tokens != seq.num_tokens:
        return False
    return seq.num_tokens > seq.num_prompt_tokens and seq.token_ids[-1] in tokenizer.all_special_ids
