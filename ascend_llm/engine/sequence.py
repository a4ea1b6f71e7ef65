"""A sequence being generated: its tokens, KV blocks and progress. Pure Python."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ascend_llm.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"        # this request failed (e.g. non-finite logits); others go on

    @property
    def is_finished(self) -> bool:
        return self in (SequenceStatus.FINISHED_STOPPED, SequenceStatus.FINISHED_LENGTH,
                        SequenceStatus.FINISHED_ABORTED, SequenceStatus.FINISHED_ERROR)

    @property
    def finish_reason(self) -> str | None:
        return self.value if self.is_finished else None


@dataclass(slots=True, eq=False)
class Sequence:
    """One generated sequence (a request with n > 1 owns n of them).

    `num_computed_tokens` counts tokens whose KV is in the cache; the scheduler
    advances it, and resets it to 0 when the sequence is preempted (recompute).
    """
    seq_id: int
    request_id: str
    index: int                      # which of the request's n outputs this is
    prompt_token_ids: list[int]
    sampling_params: "SamplingParams"
    arrival_time: float = 0.0
    token_ids: list[int] = field(default_factory=list)      # prompt + output
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0       # prompt tokens served by the prefix cache
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    stop_reason: int | str | None = None
    num_preemptions: int = 0

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
