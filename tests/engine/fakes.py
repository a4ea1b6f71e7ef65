"""Stand-ins shared by the pure-Python engine tests."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from ascend_llm.engine.sequence import Sequence


@dataclass
class Params:
    """Stand-in for SamplingParams (vLLM field names)."""
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False


_ids = itertools.count()


def make_seq(prompt: list[int], request_id: str | None = None, **params) -> Sequence:
    seq_id = next(_ids)
    return Sequence(seq_id=seq_id, request_id=request_id or f"req-{seq_id}", index=0,
                    prompt_token_ids=list(prompt), sampling_params=Params(**params))
