"""Request output objects, field-compatible with vLLM's `RequestOutput` family."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Logprob:
    """One token's log probability, its rank among the vocabulary (1 = most likely)
    and its decoded text (None until detokenized)."""
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# one entry per generated token: token id -> Logprob
SampleLogprobs = list[dict[int, Logprob]]
# one entry per prompt token; the first prompt token has no logprob (None)
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class CompletionOutput:
    """One of a request's n completions.

    `finish_reason` is None while generating, then "stop", "length", "abort" or "error"
    (the request failed on its own; `RequestOutput.error` says why);
    `stop_reason` is the stop string or stop token id that ended it (None for EOS
    or length).
    """
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None

    def __repr__(self) -> str:
        return (f"CompletionOutput(index={self.index}, text={self.text!r}, "
                f"token_ids={self.token_ids}, cumulative_logprob={self.cumulative_logprob}, "
                f"logprobs={_summarise_logprobs(self.logprobs)}, "
                f"finish_reason={self.finish_reason}, stop_reason={self.stop_reason!r})")


@dataclass
class RequestMetrics:
    """Wall-clock timestamps (time.time() seconds) of a request's life; None until reached."""
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    time_in_queue: float | None = None
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0

    @property
    def time_to_first_token(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def e2e_latency(self) -> float | None:
        if self.finished_time is None:
            return None
        return self.finished_time - self.arrival_time


@dataclass
class RequestOutput:
    """Everything the engine reports about one request at one step (or at the end)."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0
    error: str | None = None         # why the request failed (finish_reason "error"), else None
    embedding: list[float] | None = None   # return_embedding: the last prompt token's final hidden state

    def __repr__(self) -> str:
        return (f"RequestOutput(request_id={self.request_id!r}, prompt={self.prompt!r}, "
                f"prompt_token_ids={self.prompt_token_ids}, "
                f"prompt_logprobs={_summarise_logprobs(self.prompt_logprobs)}, "
                f"outputs={self.outputs}, finished={self.finished}, metrics={self.metrics}, "
                f"num_cached_tokens={self.num_cached_tokens}, error={self.error!r})")


def _summarise_logprobs(logprobs: list | None) -> str:
    """Logprob lists get long; show only how many positions they cover."""
    if logprobs is None:
        return "None"
    return f"<{len(logprobs)} positions>"
