"""N-gram (prompt lookup) draft proposer: no draft model, only the sequence's own tokens."""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ascend_llm.config import SpeculativeConfig


class NgramProposer:
    """Proposes the tokens that followed the most recent earlier occurrence of the sequence's
    last n tokens, trying n = prompt_lookup_max down to prompt_lookup_min (longest match wins).

    Repetitive text (code, quoted context, lists, a small model's loops) gives long accepted
    runs; elsewhere the proposal is usually empty and the step is an ordinary decode.
    """

    def __init__(self, config: SpeculativeConfig) -> None:
        self.num_speculative_tokens = config.num_speculative_tokens
        self.min_n = config.prompt_lookup_min
        self.max_n = config.prompt_lookup_max

    def propose(self, token_ids: list[int], max_tokens: int | None = None) -> list[int]:
        """Up to min(num_speculative_tokens, max_tokens) draft tokens to follow `token_ids`."""
        k = self.num_speculative_tokens if max_tokens is None else min(self.num_speculative_tokens, max_tokens)
        num_tokens = len(token_ids)
        if k <= 0 or num_tokens <= self.min_n:
            return []
        tokens = np.fromiter(token_ids, dtype=np.int64, count=num_tokens)    # [num_tokens]
        for n in range(min(self.max_n, num_tokens - 1), self.min_n - 1, -1):
            start = _last_earlier_match(tokens, n)
            if start is not None:
                return tokens[start + n:start + n + k].tolist()
        return []


def _last_earlier_match(tokens: np.ndarray, n: int) -> int | None:
    """Start of the last n-gram in tokens[:-1] equal to the final n tokens, None if none.

    Windows end before the last token, so at least one token follows every match.
    """
    windows = sliding_window_view(tokens[:-1], n)                  # [num_tokens - n, n]
    hits = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
    return int(hits[-1]) if hits.size else None
