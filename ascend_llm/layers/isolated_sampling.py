"""Sample a step's rows so that one row's failure costs only that row.

The batched sampler runs first. If building a row's sampling state or sampling itself
raises (a bad seed, a bug reached only by one request's parameters), the step is not
failed: every row is sampled again on its own and only the rows that still raise are
marked failed, with the reason. Rows the sampler itself rejects (non-finite logits) are
reported the same way. The engine then fails those requests alone.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Iterable

import torch

from ascend_llm.layers.sampler import GrammarBitmask, Sampler, SamplerOutput, SamplingMetadata

if TYPE_CHECKING:
    from ascend_llm.engine.sequence import Sequence

logger = logging.getLogger(__name__)


def sample_isolated(sampler: Sampler, logits: torch.Tensor, seqs: list["Sequence"],
                    eos_token_ids: Iterable[int], generators: dict[int, torch.Generator],
                    device: torch.device | str, grammar: GrammarBitmask | None = None) -> SamplerOutput:
    """One token per row of `logits` [num_rows, vocab] for `seqs` (row i = seqs[i]); `grammar`
    holds the step's structured-output masks.

    Seeded rows draw only from their own generator, so a row sampled alone gets the token
    it would have got in the batch (unless the batched attempt failed after drawing).
    """
    try:
        return sampler(logits, SamplingMetadata.build(seqs, eos_token_ids, generators, device, grammar))
    except Exception as exc:   # find the culprit rows instead of failing the whole step
        logger.warning("batched sampling of %d rows failed (%s: %s); sampling each row alone",
                       len(seqs), type(exc).__name__, exc)
    rows = [_sample_row(sampler, logits[i:i + 1], seq, eos_token_ids, generators, device, grammar)
            for i, seq in enumerate(seqs)]
    return _merge(rows)


def _sample_row(sampler: Sampler, logits: torch.Tensor, seq: "Sequence",
                eos_token_ids: Iterable[int], generators: dict[int, torch.Generator],
                device: torch.device | str, grammar: GrammarBitmask | None) -> SamplerOutput:
    """Sample one row [1, vocab]; a failure becomes a failed row, never an exception."""
    try:
        return sampler(logits, SamplingMetadata.build([seq], eos_token_ids, generators, device, grammar))
    except Exception as exc:
        logger.exception("sampling failed for request %s", seq.request_id)
        return SamplerOutput([-1], [None], [None], failed_rows={0: f"sampling failed: "
                                                                f"{type(exc).__name__}: {exc}"})


def _merge(rows: list[SamplerOutput]) -> SamplerOutput:
    """Concatenate single-row outputs into one step output."""
    failed = {i: reason for i, row in enumerate(rows) for reason in row.failed_rows.values()}
    return SamplerOutput(sampled_token_ids=[row.sampled_token_ids[0] for row in rows],
                         logprobs=[row.logprobs[0] for row in rows],
                         ranks=[row.ranks[0] for row in rows], failed_rows=failed)
