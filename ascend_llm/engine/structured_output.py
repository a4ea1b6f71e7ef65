"""Per-sequence grammar state of structured outputs: matchers, each step's bitmask, accepting tokens.

The engine owns one `StructuredOutputManager`. A sequence whose request has `structured_outputs`
gets an `xgr.GrammarMatcher` when the request is added; before each step `bitmask` fills one row
per scheduled sampling sequence with a grammar (xgrammar's `fill_next_token_bitmask`, as vLLM's
v1 structured_output/__init__.py does for its batch); after the step `accept` advances the matcher
by the tokens the sequence appended. The matcher's stop tokens are the engine's EOS ids, so a
finished grammar allows only EOS and the sequence stops with finish_reason "stop"; if it
terminates without one (ignore_eos), the engine finishes the sequence as stopped.
"""
from __future__ import annotations

import logging
from typing import Iterable

import xgrammar as xgr

from ascend_llm.engine.grammar_compiler import GrammarCompiler
from ascend_llm.engine.scheduler import SchedulerOutput
from ascend_llm.engine.sequence import Sequence
from ascend_llm.layers.sampler import GrammarBitmask
from ascend_llm.sampling_params import StructuredOutputsParams

logger = logging.getLogger(__name__)


class StructuredOutputManager:
    """Grammar matchers of the engine's sequences (keyed by seq_id) and the step bitmask."""

    def __init__(self, tokenizer: object, vocab_size: int, eos_token_ids: Iterable[int]) -> None:
        self.vocab_size = vocab_size
        self.compiler = GrammarCompiler(tokenizer, vocab_size, eos_token_ids)
        self.matchers: dict[int, xgr.GrammarMatcher] = {}

    def compile(self, spec: StructuredOutputsParams) -> xgr.CompiledGrammar:
        """Thread-safe; ValueError naming structured_outputs when the spec does not compile."""
        return self.compiler.compile(spec)

    def add_seqs(self, seqs: list[Sequence]) -> None:
        """A matcher per sequence of a request with structured outputs (compiled or cached)."""
        spec = seqs[0].sampling_params.structured_outputs if seqs else None
        if spec is None:
            return
        compiled = self.compile(spec)
        for seq in seqs:
            self.matchers[seq.seq_id] = xgr.GrammarMatcher(compiled)

    def release(self, seqs: Iterable[Sequence]) -> None:
        for seq in seqs:
            self.matchers.pop(seq.seq_id, None)

    def bitmask(self, out: SchedulerOutput) -> GrammarBitmask | None:
        """This step's masks for the sampling sequences that have a grammar (None: there are none)."""
        if not self.matchers:
            return None
        seqs = [item.seq for item in out.scheduled
                if item.do_sample and item.seq.seq_id in self.matchers]
        if not seqs:
            return None
        bitmask = xgr.allocate_token_bitmask(len(seqs), self.vocab_size)   # [k, ceil(vocab / 32)] int32, all allowed
        for row, seq in enumerate(seqs):
            matcher = self.matchers[seq.seq_id]
            if not matcher.is_terminated():
                matcher.fill_next_token_bitmask(bitmask, row)
        return GrammarBitmask(bitmask, {seq.seq_id: row for row, seq in enumerate(seqs)})

    def accept(self, seq: Sequence, tokens: list[int]) -> str | None:
        """Advance seq's matcher by the tokens it appended; why not, if one was rejected."""
        matcher = self.matchers.get(seq.seq_id)
        if matcher is None:
            return None
        for token in tokens:
            if matcher.is_terminated():
                break
            if not matcher.accept_token(token):
                return f"structured output: the grammar rejected token {token}"
        return None

    def is_terminated(self, seq: Sequence) -> bool:
        matcher = self.matchers.get(seq.seq_id)
        return matcher is not None and matcher.is_terminated()
