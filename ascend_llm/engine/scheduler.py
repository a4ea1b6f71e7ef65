"""Continuous-batching scheduler: chunked prefill, prefix caching, preemption by recompute.

Pure Python (no torch). As in vLLM v1 there are no prefill/decode phases: every sequence has
`num_computed_tokens` chasing `num_tokens`, and each step hands out a token budget, running
sequences first, then waiting ones in FIFO order.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ascend_llm.config import CacheConfig, SchedulerConfig, SpeculativeConfig
from ascend_llm.engine.block_manager import BlockManager
from ascend_llm.engine.sequence import Sequence, SequenceStatus
from ascend_llm.spec_decode import NgramProposer

StopDecision = tuple[SequenceStatus, int | None]


@dataclass(slots=True)
class ScheduledSequence:
    """Tokens [start_pos, start_pos + num_new_tokens) of `seq` are computed this step.

    With speculative decoding the last len(spec_token_ids) of them are draft tokens (not yet
    in seq.token_ids); the step samples one row per draft plus one and emits the accepted run.
    """
    seq: Sequence
    start_pos: int          # == seq.num_computed_tokens when scheduled
    num_new_tokens: int
    do_sample: bool         # the step reaches the end of the sequence and samples a token
    spec_token_ids: list[int] = field(default_factory=list)
    num_appended: int = 0   # tokens update() appended to seq (set by Scheduler.update)

    @property
    def num_sampled_rows(self) -> int:
        """Logits rows this item samples: 0, 1, or 1 + its drafts."""
        return 1 + len(self.spec_token_ids) if self.do_sample else 0

    @property
    def end_pos(self) -> int:
        return self.start_pos + self.num_new_tokens


@dataclass(slots=True)
class SchedulerOutput:
    """What one step computes, and which sequences were preempted to make room."""
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    num_batched_tokens: int = 0
    # structured-output masks of the sampling rows (a layers.sampler.GrammarBitmask), set by the
    # engine after schedule(), as vLLM's SchedulerOutput.grammar_bitmask; None without grammars
    grammar_bitmask: Any = None

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """Owns the block manager and the `waiting` / `running` queues of sequences.

    The longest a sequence may grow is `max_seq_len`: max_model_len, capped at what the whole
    KV cache holds, so a sequence alone in the cache always fits and scheduling cannot deadlock.
    """

    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig,
                 num_blocks: int, eos_token_ids: set[int],
                 speculative_config: SpeculativeConfig | None = None) -> None:
        self.scheduler_config = scheduler_config
        self.speculative_config = speculative_config
        self.proposer = None if speculative_config is None else NgramProposer(speculative_config)
        self.cache_config = cache_config
        self.block_manager = BlockManager(num_blocks, cache_config.block_size,
                                          cache_config.enable_prefix_caching)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_seq_len = min(scheduler_config.max_model_len, num_blocks * cache_config.block_size)
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0
        self.num_draft_tokens = 0        # speculative decoding counters (vLLM's spec_decode_*)
        self.num_accepted_tokens = 0

    # ----------------------------------------------------------------- state
    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def kv_cache_usage(self) -> float:
        return self.block_manager.usage

    @property
    def num_prefix_queries_tokens(self) -> int:
        return self.block_manager.num_prefix_queries_tokens

    @property
    def num_prefix_hit_tokens(self) -> int:
        return self.block_manager.num_prefix_hit_tokens

    @property
    def prefix_hit_rate(self) -> float:
        return self.block_manager.prefix_hit_rate

    def add_seq(self, seq: Sequence) -> None:
        """Queue a new sequence; it must be WAITING, hold no blocks, and fit `max_seq_len`."""
        if seq.status is not SequenceStatus.WAITING or seq.block_table:
            raise ValueError(f"add_seq: seq {seq.seq_id} must be WAITING with no blocks")
        if not 0 < seq.num_tokens <= self.max_seq_len:
            raise ValueError(f"add_seq: seq {seq.seq_id} has {seq.num_tokens} tokens; "
                             f"must be between 1 and {self.max_seq_len}")
        self.waiting.append(seq)

    # -------------------------------------------------------------- schedule
    def schedule(self) -> SchedulerOutput:
        """Pick this step's tokens: running sequences first, then (if none was preempted) waiting ones."""
        out = SchedulerOutput()
        budget = self.scheduler_config.max_num_batched_tokens
        budget = self._schedule_running(out, budget)
        if not out.preempted:
            budget = self._schedule_waiting(out, budget)
        out.num_batched_tokens = self.scheduler_config.max_num_batched_tokens - budget
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        index = 0
        speculate = self._speculation_on()
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            num_new = min(seq.num_uncomputed_tokens, budget)
            if num_new <= 0 or not self._fits_unchunked(seq, num_new):
                index += 1
                continue
            drafts = self._propose(seq, budget - num_new) if speculate and num_new == 1 else []
            if drafts and not self.block_manager.ensure_slots(seq, seq.num_computed_tokens + 1 + len(drafts)):
                drafts = []                       # never preempt anyone for draft slots
            if not self._make_room(seq, seq.num_computed_tokens + num_new, out.preempted):
                break
            item = self._scheduled(seq, num_new)
            if drafts:
                item.spec_token_ids = drafts
                item.num_new_tokens += len(drafts)
            out.scheduled.append(item)
            budget -= item.num_new_tokens
            index += 1
        return budget

    def _speculation_on(self) -> bool:
        config = self.speculative_config
        return config is not None and (config.disable_by_batch_size is None
                                       or len(self.running) < config.disable_by_batch_size)

    def _propose(self, seq: Sequence, budget: int) -> list[int]:
        """Draft tokens for a decoding sequence: no more than the token budget, the sequence's
        length limit or its remaining max_tokens leave room for (the step also emits one)."""
        params = seq.sampling_params
        room = min(budget, self.max_seq_len - seq.num_tokens - 1)
        if params.max_tokens is not None:
            room = min(room, params.max_tokens - seq.num_output_tokens - 1)
        return self.proposer.propose(seq.token_ids, room) if room > 0 else []

    def _make_room(self, seq: Sequence, num_tokens: int, preempted: list[Sequence]) -> bool:
        """Get blocks for `seq`, preempting the most recently admitted sequences; False if `seq` went."""
        while not self.block_manager.ensure_slots(seq, num_tokens):
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_cached_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> int:
        max_num_seqs = self.scheduler_config.max_num_seqs
        while self.waiting and budget > 0 and len(self.running) < max_num_seqs:
            seq = self.waiting[0]
            num_new = self._admit(seq, budget)
            if num_new is None:
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(self._scheduled(seq, num_new))
            budget -= num_new
        return budget

    def _admit(self, seq: Sequence, budget: int) -> int | None:
        """Reserve prefix-cache hits and blocks for a waiting sequence; its token count, or None."""
        self.block_manager.allocate_prefix(seq)
        num_new = min(seq.num_uncomputed_tokens, budget)
        if self._fits_unchunked(seq, num_new) and \
                self.block_manager.ensure_slots(seq, seq.num_computed_tokens + num_new):
            return num_new
        self.block_manager.rollback_prefix(seq)
        return None

    def _fits_unchunked(self, seq: Sequence, num_new: int) -> bool:
        return self.scheduler_config.enable_chunked_prefill or num_new == seq.num_uncomputed_tokens

    @staticmethod
    def _scheduled(seq: Sequence, num_new: int) -> ScheduledSequence:
        start = seq.num_computed_tokens
        return ScheduledSequence(seq, start, num_new, start + num_new == seq.num_tokens)

    # ---------------------------------------------------------------- update
    def update(self, out: SchedulerOutput,
               sampled_token_ids: list[int | list[int] | None]) -> list[Sequence]:
        """Record a finished step: advance progress, append tokens, cache full blocks, stop sequences.

        Per scheduled item: None (nothing sampled), a token id, or the list of tokens a verified
        speculative step emits (accepted drafts, then one sampled token). Tokens after a stop
        are dropped; `item.num_appended` says how many were kept.
        """
        if len(sampled_token_ids) != len(out.scheduled):
            raise ValueError(f"update: {len(sampled_token_ids)} sampled tokens for "
                             f"{len(out.scheduled)} scheduled sequences")
        emitted = [_as_token_list(item, tokens) for item, tokens in zip(out.scheduled, sampled_token_ids)]
        finished: list[Sequence] = []
        for item, tokens in zip(out.scheduled, emitted):
            seq = item.seq
            if seq.status is not SequenceStatus.RUNNING:    # aborted since schedule()
                continue
            # KV is valid for the step's real tokens and the accepted drafts, not the rejected ones
            num_rejected = len(item.spec_token_ids) - max(0, len(tokens) - 1)
            seq.num_computed_tokens += item.num_new_tokens - num_rejected
            decision = self._append(item, tokens)
            self.block_manager.cache_full_blocks(seq, min(seq.num_computed_tokens, seq.num_tokens))
            if decision is not None:
                self.finish_seq(seq, *decision)
                finished.append(seq)
        return finished

    def _append(self, item: ScheduledSequence, tokens: list[int]) -> StopDecision | None:
        """Append `tokens` to the item's sequence up to the first one that stops it."""
        if item.spec_token_ids:
            self.num_draft_tokens += len(item.spec_token_ids)
            self.num_accepted_tokens += len(tokens) - 1
        for token_id in tokens:
            item.seq.append_token(token_id)
            item.num_appended += 1
            decision = self._check_stop(item.seq, token_id)
            if decision is not None:
                return decision
        return None

    def _check_stop(self, seq: Sequence, token_id: int) -> StopDecision | None:
        params = seq.sampling_params
        if seq.num_output_tokens >= params.min_tokens:
            if token_id in self.eos_token_ids and not params.ignore_eos:
                return SequenceStatus.FINISHED_STOPPED, None
            if token_id in (params.stop_token_ids or ()):
                return SequenceStatus.FINISHED_STOPPED, token_id
        if params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens:
            return SequenceStatus.FINISHED_LENGTH, None
        if seq.num_tokens >= self.max_seq_len:
            return SequenceStatus.FINISHED_LENGTH, None
        return None

    @property
    def spec_acceptance_rate(self) -> float:
        """Fraction of proposed draft tokens that were accepted (0 before any draft)."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    # ---------------------------------------------------------------- finish
    def finish_seq(self, seq: Sequence, status: SequenceStatus,
                   stop_reason: int | str | None = None) -> None:
        """Finish `seq` with `status`: take it out of its queue and free its blocks."""
        if not status.is_finished:
            raise ValueError(f"finish_seq: {status} is not a finished status")
        for queue in (self.running, self.waiting):
            if seq in queue:
                queue.remove(seq)
                break
        self.block_manager.free(seq)
        seq.status = status
        seq.stop_reason = stop_reason

    def abort_request(self, request_id: str,
                      status: SequenceStatus = SequenceStatus.FINISHED_ABORTED) -> list[Sequence]:
        """Finish every waiting or running sequence of the request with `status` (aborted, or
        FINISHED_ERROR for a request that failed alone); returns them."""
        seqs = [seq for seq in (*self.waiting, *self.running) if seq.request_id == request_id]
        for seq in seqs:
            self.finish_seq(seq, status)
        return seqs

    def check_invariants(self) -> None:
        """Raise AssertionError unless queues, statuses and blocks are consistent (for tests)."""
        for seq in self.waiting:
            if seq.status is not SequenceStatus.WAITING or seq.block_table:
                raise AssertionError(f"waiting seq {seq.seq_id} is {seq.status} with {seq.block_table}")
        for seq in self.running:
            if seq.status is not SequenceStatus.RUNNING or seq.num_uncomputed_tokens <= 0:
                raise AssertionError(f"running seq {seq.seq_id} is {seq.status}, "
                                     f"{seq.num_uncomputed_tokens} tokens to compute")
            if len(seq.block_table) < self.block_manager.blocks_needed(seq.num_computed_tokens):
                raise AssertionError(f"running seq {seq.seq_id} lacks blocks for its computed tokens")
        if len(self.running) > self.scheduler_config.max_num_seqs:
            raise AssertionError("more running sequences than max_num_seqs")
        if len({id(seq) for seq in (*self.waiting, *self.running)}) != len(self.waiting) + len(self.running):
            raise AssertionError("a sequence is queued twice")
        self.block_manager.check_invariants(self.running)


def _as_token_list(item: ScheduledSequence, tokens: int | list[int] | None) -> list[int]:
    """Normalise one item's sampled tokens to a list, checking it matches what was scheduled."""
    if tokens is None:
        tokens = []
    elif isinstance(tokens, int):
        tokens = [tokens]
    running = item.seq.status is SequenceStatus.RUNNING
    if item.do_sample and not tokens and running:
        raise ValueError(f"update: seq {item.seq.seq_id} was sampled but got no token")
    if len(tokens) > len(item.spec_token_ids) + 1 or (tokens and not item.do_sample):
        raise ValueError(f"update: seq {item.seq.seq_id} got {len(tokens)} tokens for "
                         f"{item.num_sampled_rows} sampled rows")
    return list(tokens)
