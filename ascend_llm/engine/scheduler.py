"""Continuous-batching scheduler: chunked prefill, prefix caching, preemption by recompute.

Pure Python (no torch). As in vLLM v1 there are no prefill/decode phases: every sequence has
`num_computed_tokens` chasing `num_tokens`, and each step hands out a token budget, running
sequences first, then waiting ones in FIFO order.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ascend_llm.config import CacheConfig, SchedulerConfig
from ascend_llm.engine.block_manager import BlockManager
from ascend_llm.engine.sequence import Sequence, SequenceStatus

StopDecision = tuple[SequenceStatus, int | None]


@dataclass(slots=True)
class ScheduledSequence:
    """Tokens [start_pos, start_pos + num_new_tokens) of `seq` are computed this step."""
    seq: Sequence
    start_pos: int          # == seq.num_computed_tokens when scheduled
    num_new_tokens: int
    do_sample: bool         # the step reaches the end of the sequence and samples a token

    @property
    def end_pos(self) -> int:
        return self.start_pos + self.num_new_tokens


@dataclass(slots=True)
class SchedulerOutput:
    """What one step computes, and which sequences were preempted to make room."""
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    num_batched_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """Owns the block manager and the `waiting` / `running` queues of sequences.

    The longest a sequence may grow is `max_seq_len`: max_model_len, capped at what the whole
    KV cache holds, so a sequence alone in the cache always fits and scheduling cannot deadlock.
    """

    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig,
                 num_blocks: int, eos_token_ids: set[int]) -> None:
        self.scheduler_config = scheduler_config
        self.cache_config = cache_config
        self.block_manager = BlockManager(num_blocks, cache_config.block_size,
                                          cache_config.enable_prefix_caching)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_seq_len = min(scheduler_config.max_model_len, num_blocks * cache_config.block_size)
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

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
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            num_new = min(seq.num_uncomputed_tokens, budget)
            if num_new <= 0 or not self._fits_unchunked(seq, num_new):
                index += 1
                continue
            if not self._make_room(seq, seq.num_computed_tokens + num_new, out.preempted):
                break
            out.scheduled.append(self._scheduled(seq, num_new))
            budget -= num_new
            index += 1
        return budget

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
    def update(self, out: SchedulerOutput, sampled_token_ids: list[int | None]) -> list[Sequence]:
        """Record a finished step: advance progress, cache full blocks, append tokens, stop sequences."""
        if len(sampled_token_ids) != len(out.scheduled):
            raise ValueError(f"update: {len(sampled_token_ids)} sampled tokens for "
                             f"{len(out.scheduled)} scheduled sequences")
        for item, token_id in zip(out.scheduled, sampled_token_ids):
            if item.do_sample and token_id is None and item.seq.status is SequenceStatus.RUNNING:
                raise ValueError(f"update: seq {item.seq.seq_id} was sampled but got no token")
        finished: list[Sequence] = []
        for item, token_id in zip(out.scheduled, sampled_token_ids):
            seq = item.seq
            if seq.status is not SequenceStatus.RUNNING:    # aborted since schedule()
                continue
            seq.num_computed_tokens += item.num_new_tokens
            self.block_manager.cache_full_blocks(seq, seq.num_computed_tokens)
            if not item.do_sample or token_id is None:
                continue
            seq.append_token(token_id)
            decision = self._check_stop(seq, token_id)
            if decision is not None:
                self.finish_seq(seq, *decision)
                finished.append(seq)
        return finished

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

    def abort_request(self, request_id: str) -> list[Sequence]:
        """Abort every waiting or running sequence of the request; returns them."""
        seqs = [seq for seq in (*self.waiting, *self.running) if seq.request_id == request_id]
        for seq in seqs:
            self.finish_seq(seq, SequenceStatus.FINISHED_ABORTED)
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
