"""Scheduler: continuous batching, chunked prefill, prefix caching, preemption, stopping rules.

A fake model keeps a fake paged KV cache: for every computed position it writes a value that
depends on the whole prefix up to that position, and before each step it checks that every
position the scheduler claims is computed holds the right value in the block the block table
names. Sampled tokens are derived from that cache, so any block-management bug shows up as a
failed read or as a token stream that differs from the single-sequence reference.
"""
from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from ascend_llm.config import CacheConfig, SchedulerConfig
from ascend_llm.engine.scheduler import Scheduler, SchedulerOutput
from ascend_llm.engine.sequence import Sequence, SequenceStatus
from tests.engine.fakes import Params, make_seq

EOS = 0
VOCAB = 64


def make_scheduler(num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 8,
                   max_num_batched_tokens: int = 64, max_model_len: int = 64,
                   chunked: bool = True, prefix_caching: bool = True,
                   eos: set[int] | None = None) -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                        max_model_len=max_model_len, enable_chunked_prefill=chunked),
        CacheConfig(block_size=block_size, enable_prefix_caching=prefix_caching),
        num_blocks, {EOS} if eos is None else eos)


# ------------------------------------------------------------------ fake model
def prefix_states(tokens: list[int]) -> list[int]:
    """The fake 'KV' at each position: a chained hash of all tokens up to it."""
    states, state = [], 17
    for token in tokens:
        state = hash((state, token)) & 0xFFFFFFFF
        states.append(state)
    return states


def default_sample(state: int, seq: Sequence) -> int:
    return state % VOCAB


Sampler = Callable[[int, Sequence], int]


class FakeModel:
    """Reads and writes a fake paged KV cache through the scheduler's block tables."""

    def __init__(self, scheduler: Scheduler, sample: Sampler = default_sample) -> None:
        self.bm = scheduler.block_manager
        self.sample = sample
        self.kv: dict[tuple[int, int], int] = {}

    def run(self, out: SchedulerOutput) -> list[int | None]:
        sampled: list[int | None] = []
        for item in out.scheduled:
            seq, size = item.seq, self.bm.block_size
            states = prefix_states(seq.token_ids[:item.end_pos])
            for pos in range(item.start_pos):
                slot = (seq.block_table[pos // size], pos % size)
                assert self.kv.get(slot) == states[pos], f"seq {seq.seq_id}: stale KV at {pos}"
            for pos in range(item.start_pos, item.end_pos):
                block = seq.block_table[pos // size]
                assert self.bm.ref_count(block) == 1, "writing into a shared block"
                self.kv[(block, pos % size)] = states[pos]
            sampled.append(self.sample(states[-1], seq) if item.do_sample else None)
        return sampled


def scripted(script: list[int]) -> Sampler:
    """Sampler emitting script[i] as the i-th output token (last entry repeats)."""
    return lambda state, seq: script[min(seq.num_output_tokens, len(script) - 1)]


# -------------------------------------------------------------------- harness
def check_step(sched: Scheduler, out: SchedulerOutput, running_before: list[Sequence]) -> None:
    cfg, bm = sched.scheduler_config, sched.block_manager
    assert out.num_batched_tokens == sum(item.num_new_tokens for item in out.scheduled)
    assert out.num_batched_tokens <= cfg.max_num_batched_tokens
    assert len(out.scheduled) <= cfg.max_num_seqs and sched.num_running <= cfg.max_num_seqs
    assert len({id(item.seq) for item in out.scheduled}) == len(out.scheduled)
    for item in out.scheduled:
        seq = item.seq
        assert seq.status is SequenceStatus.RUNNING and seq in sched.running
        assert item.start_pos == seq.num_computed_tokens and item.num_new_tokens >= 1
        assert item.end_pos <= seq.num_tokens
        assert item.do_sample == (item.end_pos == seq.num_tokens)
        assert len(seq.block_table) >= bm.blocks_needed(item.end_pos)
        if not cfg.enable_chunked_prefill:
            assert item.end_pos == seq.num_tokens
    for seq in out.preempted:
        assert seq.status is SequenceStatus.WAITING and seq in sched.waiting
        assert seq.block_table == [] and seq.num_computed_tokens == 0
    if out.preempted:                       # no admissions in a step that preempted
        assert all(any(item.seq is s for s in running_before) for item in out.scheduled)
    if sched.has_unfinished():
        assert not out.is_empty, "no progress with unfinished sequences"


def step(sched: Scheduler, model: FakeModel) -> tuple[SchedulerOutput, list[Sequence]]:
    running_before = list(sched.running)
    out = sched.schedule()
    check_step(sched, out, running_before)
    sched.check_invariants()
    finished = sched.update(out, model.run(out))
    for seq in finished:
        assert seq.is_finished and seq.block_table == []
        assert seq not in sched.running and seq not in sched.waiting
    sched.check_invariants()
    return out, finished


def run_to_completion(sched: Scheduler, seqs: list[Sequence], sample: Sampler = default_sample,
                      max_steps: int = 5000) -> list[SchedulerOutput]:
    model = FakeModel(sched, sample)
    for seq in seqs:
        sched.add_seq(seq)
    outs = []
    while sched.has_unfinished():
        outs.append(step(sched, model)[0])
        assert len(outs) < max_steps
    assert all(seq.is_finished for seq in seqs)
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks
    assert sched.kv_cache_usage == 0.0
    return outs


def reference(prompt: list[int], params: Params, eos: set[int], max_len: int,
              sample: Sampler = default_sample) -> tuple[list[int], SequenceStatus, int | None]:
    """Independent single-sequence generation with vLLM's stopping rules."""
    probe = make_seq(prompt)
    while True:
        token = sample(prefix_states(probe.token_ids)[-1], probe)
        probe.append_token(token)
        n_out = probe.num_output_tokens
        if n_out >= params.min_tokens:
            if token in eos and not params.ignore_eos:
                return probe.output_token_ids, SequenceStatus.FINISHED_STOPPED, None
            if token in params.stop_token_ids:
                return probe.output_token_ids, SequenceStatus.FINISHED_STOPPED, token
        if (params.max_tokens is not None and n_out >= params.max_tokens) or probe.num_tokens >= max_len:
            return probe.output_token_ids, SequenceStatus.FINISHED_LENGTH, None


def assert_matches_reference(sched: Scheduler, seq: Sequence, sample: Sampler = default_sample) -> None:
    tokens, status, reason = reference(seq.prompt_token_ids, seq.sampling_params,
                                       set(sched.eos_token_ids), sched.max_seq_len, sample)
    assert (seq.output_token_ids, seq.status, seq.stop_reason) == (tokens, status, reason)


def rand_prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1, VOCAB) for _ in range(n)]


# --------------------------------------------------------------- basic flow
def test_empty_scheduler() -> None:
    sched = make_scheduler()
    out = sched.schedule()
    assert out.is_empty and out.num_batched_tokens == 0 and out.preempted == []
    assert not sched.has_unfinished() and sched.update(out, []) == []


def test_single_sequence_prefill_then_decode() -> None:
    sched = make_scheduler()
    seq = make_seq([5, 6, 7, 8, 9], max_tokens=4)
    outs = run_to_completion(sched, [seq])
    assert [(o.scheduled[0].start_pos, o.scheduled[0].num_new_tokens) for o in outs] == \
        [(0, 5), (5, 1), (6, 1), (7, 1)]
    assert all(o.scheduled[0].do_sample for o in outs)
    assert seq.num_output_tokens == 4 and seq.status is SequenceStatus.FINISHED_LENGTH
    assert seq.status.finish_reason == "length"
    assert_matches_reference(sched, seq)


def test_add_seq_validation() -> None:
    sched = make_scheduler(max_model_len=16)
    with pytest.raises(ValueError):
        sched.add_seq(make_seq([1] * 17))
    with pytest.raises(ValueError):
        sched.add_seq(make_seq([]))
    running = make_seq([1, 2])
    running.status = SequenceStatus.RUNNING
    with pytest.raises(ValueError):
        sched.add_seq(running)
    sched.add_seq(make_seq([1] * 16))
    assert sched.num_waiting == 1 and sched.num_running == 0


def test_waiting_admitted_fifo() -> None:
    sched = make_scheduler(max_num_seqs=2)
    seqs = [make_seq([i + 1] * 3, max_tokens=2) for i in range(5)]
    model = FakeModel(sched)
    for seq in seqs:
        sched.add_seq(seq)
    out, _ = step(sched, model)
    assert [item.seq for item in out.scheduled] == seqs[:2]
    assert list(sched.waiting) == seqs[2:]


def test_token_budget_and_max_num_seqs_respected() -> None:
    sched = make_scheduler(max_num_seqs=3, max_num_batched_tokens=16, num_blocks=200)
    rng = random.Random(0)
    seqs = [make_seq(rand_prompt(rng, rng.randint(3, 30)), max_tokens=rng.randint(1, 10))
            for _ in range(12)]
    outs = run_to_completion(sched, seqs)
    assert max(len(o.scheduled) for o in outs) == 3
    assert max(o.num_batched_tokens for o in outs) == 16
    for seq in seqs:
        assert_matches_reference(sched, seq)


def test_decode_and_prefill_share_a_step() -> None:
    sched = make_scheduler(max_num_batched_tokens=8)
    model = FakeModel(sched)
    a = make_seq([1, 2, 3], max_tokens=5)
    sched.add_seq(a)
    step(sched, model)
    b = make_seq(list(range(10, 30)), max_tokens=2)
    sched.add_seq(b)
    out, _ = step(sched, model)
    assert [(i.seq, i.start_pos, i.num_new_tokens, i.do_sample) for i in out.scheduled] == \
        [(a, 3, 1, True), (b, 0, 7, False)]


# ----------------------------------------------------------- chunked prefill
def test_chunked_prefill_splits_long_prompt() -> None:
    sched = make_scheduler(max_num_batched_tokens=16, block_size=4, max_model_len=64)
    seq = make_seq(list(range(1, 51)), max_tokens=3)
    outs = run_to_completion(sched, [seq])
    chunks = [(o.scheduled[0].start_pos, o.scheduled[0].num_new_tokens, o.scheduled[0].do_sample)
              for o in outs]
    assert chunks == [(0, 16, False), (16, 16, False), (32, 16, False), (48, 2, True),
                      (50, 1, True), (51, 1, True)]
    assert_matches_reference(sched, seq)


@pytest.mark.parametrize("block_size,budget", [(4, 8), (4, 4), (4, 6), (8, 5), (2, 3), (1, 7), (16, 16)])
def test_chunk_boundaries_on_and_off_block_boundaries(block_size: int, budget: int) -> None:
    sched = make_scheduler(block_size=block_size, max_num_batched_tokens=budget,
                           num_blocks=256 // block_size, max_model_len=128)
    rng = random.Random(block_size * 100 + budget)
    seqs = [make_seq(rand_prompt(rng, n), max_tokens=4) for n in (1, block_size, 3 * block_size + 1, 37)]
    model = FakeModel(sched)
    for seq in seqs:
        sched.add_seq(seq)
    while sched.has_unfinished():
        step(sched, model)
        for seq in sched.running:            # blocks grow with the computed chunk, no more
            assert len(seq.block_table) == sched.block_manager.blocks_needed(seq.num_computed_tokens)
    for seq in seqs:
        assert_matches_reference(sched, seq)


def test_chunked_prefill_disabled_waits_for_whole_prompt() -> None:
    sched = make_scheduler(chunked=False, max_num_batched_tokens=20, max_model_len=20)
    model = FakeModel(sched)
    a, b = make_seq(list(range(1, 16)), max_tokens=3), make_seq(list(range(30, 40)), max_tokens=3)
    sched.add_seq(a)
    sched.add_seq(b)
    out, _ = step(sched, model)
    assert [(i.seq, i.num_new_tokens) for i in out.scheduled] == [(a, 15)]
    assert list(sched.waiting) == [b] and b.block_table == []
    out, _ = step(sched, model)
    assert [(i.seq, i.num_new_tokens) for i in out.scheduled] == [(a, 1), (b, 10)]
    while sched.has_unfinished():
        step(sched, model)
    for seq in (a, b):
        assert_matches_reference(sched, seq)


# ------------------------------------------------------------- preemption
def test_preemption_evicts_most_recent_and_requeues_it_first() -> None:
    sched = make_scheduler(block_size=2, num_blocks=4, max_model_len=8, max_num_seqs=4)
    model = FakeModel(sched)
    a, b = make_seq([1, 2, 3], max_tokens=8), make_seq([4, 5, 6], max_tokens=8)
    c = make_seq([7], max_tokens=1)
    for seq in (a, b, c):
        sched.add_seq(seq)
    step(sched, model)                       # a, b prefill: 2 blocks each; c does not fit
    assert list(sched.running) == [a, b] and list(sched.waiting) == [c]
    step(sched, model)                       # both decode inside their second block
    out, _ = step(sched, model)              # a needs a third block: b is preempted
    assert out.preempted == [b] and [i.seq for i in out.scheduled] == [a]
    assert list(sched.waiting) == [b, c]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0 and b.block_table == []
    assert b.num_preemptions == 1 and sched.num_preemptions == 1
    assert b.num_output_tokens == 2          # generated tokens are kept for recompute
    while sched.has_unfinished():
        step(sched, model)
    assert a.num_tokens == b.num_tokens == 8     # capped by max_model_len
    for seq in (a, b, c):
        assert_matches_reference(sched, seq)


def test_sequence_preempting_itself_stops_the_step() -> None:
    sched = make_scheduler(block_size=2, num_blocks=5, max_model_len=10, prefix_caching=False)
    model = FakeModel(sched)
    a, b = make_seq([1, 2, 3, 4], max_tokens=6), make_seq([5, 6, 7, 8], max_tokens=6)
    sched.add_seq(a)
    sched.add_seq(b)
    step(sched, model)                       # 4 of 5 blocks used
    out, _ = step(sched, model)              # a takes the last block; b needs one: b is the victim
    assert [i.seq for i in out.scheduled] == [a] and out.preempted == [b]
    assert list(sched.running) == [a] and list(sched.waiting) == [b]
    while sched.has_unfinished():
        step(sched, model)
    for seq in (a, b):
        assert_matches_reference(sched, seq)


@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("chunked", [True, False])
def test_preemption_produces_same_tokens_as_plenty_of_blocks(prefix_caching: bool, chunked: bool) -> None:
    def run(num_blocks: int) -> tuple[list[list[int]], int]:
        rng = random.Random(7)
        shared = rand_prompt(rng, 9)
        seqs = [make_seq((shared if i % 2 else []) + rand_prompt(rng, rng.randint(2, 12)),
                         max_tokens=rng.randint(10, 30)) for i in range(8)]
        sched = make_scheduler(block_size=4, num_blocks=num_blocks, max_num_batched_tokens=48,
                               max_model_len=48, chunked=chunked, prefix_caching=prefix_caching)
        run_to_completion(sched, seqs)
        return [seq.output_token_ids for seq in seqs], sched.num_preemptions

    small, num_preempted = run(num_blocks=14)
    large, none_preempted = run(num_blocks=1000)
    assert num_preempted > 0 and none_preempted == 0
    assert small == large


def test_single_sequence_filling_whole_cache_does_not_deadlock() -> None:
    sched = make_scheduler(block_size=4, num_blocks=3, max_model_len=100, max_num_batched_tokens=100)
    assert sched.max_seq_len == 12
    seq = make_seq(list(range(1, 11)), max_tokens=None)
    run_to_completion(sched, [seq], max_steps=20)
    assert seq.num_tokens == 12 and seq.status is SequenceStatus.FINISHED_LENGTH


def test_sequences_larger_than_half_the_cache_take_turns() -> None:
    sched = make_scheduler(block_size=2, num_blocks=6, max_model_len=12, max_num_batched_tokens=12)
    seqs = [make_seq([i + 1] * 3, max_tokens=None) for i in range(3)]     # all admitted at first
    run_to_completion(sched, seqs, max_steps=500)
    assert sched.num_preemptions > 0
    for seq in seqs:
        assert seq.num_tokens == 12
        assert_matches_reference(sched, seq)


# --------------------------------------------------------- prefix caching
def test_prefix_hit_skips_computed_tokens() -> None:
    sched = make_scheduler(block_size=4)
    model = FakeModel(sched)
    shared = list(range(1, 17))
    a = make_seq(shared + [40, 41, 42, 43], max_tokens=1)
    sched.add_seq(a)
    step(sched, model)
    assert a.is_finished
    b = make_seq(shared + [50, 51], max_tokens=2)
    sched.add_seq(b)
    out, _ = step(sched, model)
    item = out.scheduled[0]
    assert (item.start_pos, item.num_new_tokens) == (16, 2)
    assert b.num_cached_tokens == 16
    assert sched.num_prefix_hit_tokens == 16
    assert sched.num_prefix_queries_tokens == 20 + 18
    assert sched.prefix_hit_rate == pytest.approx(16 / 38)
    while sched.has_unfinished():
        step(sched, model)
    assert_matches_reference(sched, b)


def test_prefix_shared_between_running_sequences() -> None:
    sched = make_scheduler(block_size=4)
    model = FakeModel(sched)
    shared = list(range(1, 13))
    a = make_seq(shared + [30], max_tokens=6)
    sched.add_seq(a)
    step(sched, model)
    b = make_seq(shared + [31, 32], max_tokens=6)
    sched.add_seq(b)
    out, _ = step(sched, model)
    assert out.scheduled[1].start_pos == 12
    assert b.block_table[:3] == a.block_table[:3]
    assert all(sched.block_manager.ref_count(blk) == 2 for blk in a.block_table[:3])
    while sched.has_unfinished():
        step(sched, model)
    for seq in (a, b):
        assert_matches_reference(sched, seq)


def test_fully_cached_prompt_still_computes_last_block() -> None:
    sched = make_scheduler(block_size=4)
    model = FakeModel(sched)
    prompt = list(range(1, 9))
    first = make_seq(prompt, max_tokens=1)
    sched.add_seq(first)
    step(sched, model)
    again = make_seq(prompt, max_tokens=1)
    sched.add_seq(again)
    out, _ = step(sched, model)
    assert (out.scheduled[0].start_pos, out.scheduled[0].num_new_tokens) == (4, 4)
    assert again.output_token_ids == first.output_token_ids


def test_preempted_sequence_hits_its_own_cached_blocks() -> None:
    sched = make_scheduler(block_size=2, num_blocks=5, max_model_len=10)
    model = FakeModel(sched)
    a, b = make_seq([1, 2, 3, 4], max_tokens=2), make_seq([5, 6, 7, 8], max_tokens=6)
    sched.add_seq(a)
    sched.add_seq(b)
    step(sched, model)
    out, finished = step(sched, model)       # b preempted; a finishes and frees its blocks
    assert out.preempted == [b] and finished == [a]
    hits_before = sched.num_prefix_hit_tokens
    out, _ = step(sched, model)
    assert [(i.seq, i.start_pos, i.num_new_tokens) for i in out.scheduled] == [(b, 4, 1)]
    assert b.num_cached_tokens == 4 and sched.num_prefix_hit_tokens == hits_before + 4
    while sched.has_unfinished():
        step(sched, model)
    assert_matches_reference(sched, b)


# ------------------------------------------------------------------- aborts
def test_abort_mid_prefill_frees_blocks() -> None:
    sched = make_scheduler(max_num_batched_tokens=8, block_size=4)
    model = FakeModel(sched)
    seq = make_seq(list(range(1, 30)), request_id="r1")
    sched.add_seq(seq)
    step(sched, model)
    assert 0 < seq.num_computed_tokens < seq.num_prompt_tokens and seq.block_table
    assert sched.abort_request("r1") == [seq]
    assert seq.status is SequenceStatus.FINISHED_ABORTED and seq.block_table == []
    assert not sched.has_unfinished() and sched.kv_cache_usage == 0.0
    sched.check_invariants()


def test_abort_mid_decode_keeps_others_running() -> None:
    sched = make_scheduler()
    model = FakeModel(sched)
    a = make_seq([1, 2, 3], request_id="a", max_tokens=10)
    b = make_seq([4, 5, 6], request_id="b", max_tokens=10)
    sched.add_seq(a)
    sched.add_seq(b)
    step(sched, model)
    step(sched, model)
    assert sched.abort_request("a") == [a]
    assert list(sched.running) == [b] and a.block_table == []
    while sched.has_unfinished():
        step(sched, model)
    assert a.num_output_tokens == 2
    assert_matches_reference(sched, b)


def test_abort_waiting_and_multi_sequence_request() -> None:
    sched = make_scheduler(max_num_seqs=1)
    model = FakeModel(sched)
    seqs = [make_seq([1, 2, 3], request_id="r", max_tokens=5) for _ in range(3)]
    other = make_seq([9, 9], request_id="o", max_tokens=2)
    for seq in seqs + [other]:
        sched.add_seq(seq)
    step(sched, model)
    assert sched.abort_request("nope") == []
    aborted = sched.abort_request("r")
    assert set(map(id, aborted)) == set(map(id, seqs))
    assert all(s.status is SequenceStatus.FINISHED_ABORTED for s in seqs)
    assert list(sched.waiting) == [other] and sched.num_running == 0
    sched.check_invariants()
    while sched.has_unfinished():
        step(sched, model)
    assert_matches_reference(sched, other)


def test_abort_between_schedule_and_update() -> None:
    sched = make_scheduler()
    model = FakeModel(sched)
    a, b = make_seq([1, 2, 3], request_id="a"), make_seq([4, 5], request_id="b", max_tokens=3)
    sched.add_seq(a)
    sched.add_seq(b)
    out = sched.schedule()
    sampled = model.run(out)
    sched.abort_request("a")
    assert sched.update(out, sampled) == []
    assert a.num_output_tokens == 0 and a.block_table == []
    sched.check_invariants()
    while sched.has_unfinished():
        step(sched, model)
    assert_matches_reference(sched, b)


def test_finish_seq_with_stop_string() -> None:
    sched = make_scheduler()
    model = FakeModel(sched)
    seq = make_seq([1, 2, 3])
    sched.add_seq(seq)
    step(sched, model)
    sched.finish_seq(seq, SequenceStatus.FINISHED_STOPPED, "\n\n")
    assert seq.stop_reason == "\n\n" and seq.status.finish_reason == "stop"
    assert not sched.has_unfinished() and sched.kv_cache_usage == 0.0
    with pytest.raises(ValueError):
        sched.finish_seq(seq, SequenceStatus.RUNNING)


def test_update_validates_input() -> None:
    sched = make_scheduler()
    sched.add_seq(make_seq([1, 2, 3]))
    out = sched.schedule()
    with pytest.raises(ValueError):
        sched.update(out, [])
    with pytest.raises(ValueError):
        sched.update(out, [None])


# -------------------------------------------------------------- stop rules
def run_script(script: list[int], eos: set[int] | None = None, max_model_len: int = 64,
               **params) -> Sequence:
    sched = make_scheduler(eos=eos, max_model_len=max_model_len)
    seq = make_seq([1, 2, 3], **params)
    run_to_completion(sched, [seq], sample=scripted(script))
    assert_matches_reference(sched, seq, scripted(script))
    return seq


def test_eos_stops() -> None:
    seq = run_script([5, 6, EOS, 7])
    assert seq.output_token_ids == [5, 6, EOS]
    assert seq.status is SequenceStatus.FINISHED_STOPPED and seq.stop_reason is None


def test_multiple_eos_ids() -> None:
    seq = run_script([5, 9, 6], eos={EOS, 9})
    assert seq.output_token_ids == [5, 9] and seq.status is SequenceStatus.FINISHED_STOPPED


def test_min_tokens_suppresses_early_stop() -> None:
    seq = run_script([EOS], min_tokens=3)
    assert seq.output_token_ids == [EOS] * 3 and seq.status is SequenceStatus.FINISHED_STOPPED
    seq = run_script([7, 7, 7, 8], stop_token_ids=[7], min_tokens=2)
    assert seq.output_token_ids == [7, 7] and seq.stop_reason == 7


def test_min_tokens_does_not_extend_past_max_tokens() -> None:
    seq = run_script([5], min_tokens=10, max_tokens=3)
    assert seq.output_token_ids == [5, 5, 5] and seq.status is SequenceStatus.FINISHED_LENGTH


def test_ignore_eos() -> None:
    seq = run_script([EOS], ignore_eos=True, max_tokens=4)
    assert seq.output_token_ids == [EOS] * 4 and seq.status is SequenceStatus.FINISHED_LENGTH


def test_stop_token_ids() -> None:
    seq = run_script([5, 6, 7, 8], stop_token_ids=[7, 8])
    assert seq.output_token_ids == [5, 6, 7]
    assert seq.status is SequenceStatus.FINISHED_STOPPED and seq.stop_reason == 7
    seq = run_script([5, 6, 7, 8], stop_token_ids=[7], min_tokens=4, max_tokens=4)
    assert seq.output_token_ids == [5, 6, 7, 8] and seq.status is SequenceStatus.FINISHED_LENGTH


def test_stop_token_wins_over_length_on_same_token() -> None:
    seq = run_script([5, 6, EOS], max_tokens=3)
    assert seq.status is SequenceStatus.FINISHED_STOPPED


def test_max_model_len_stops_without_max_tokens() -> None:
    seq = run_script([5], max_model_len=12, max_tokens=None)
    assert seq.num_tokens == 12 and seq.status is SequenceStatus.FINISHED_LENGTH


def test_prompt_of_max_model_len_generates_one_token() -> None:
    sched = make_scheduler(max_model_len=8, max_num_batched_tokens=8)
    seq = make_seq(list(range(1, 9)), max_tokens=None)
    run_to_completion(sched, [seq])
    assert seq.num_output_tokens == 1 and seq.status is SequenceStatus.FINISHED_LENGTH


# ------------------------------------------------------------------ stats
def test_kv_cache_usage_tracks_blocks() -> None:
    sched = make_scheduler(num_blocks=10, block_size=4)
    model = FakeModel(sched)
    seq = make_seq(list(range(1, 10)))
    sched.add_seq(seq)
    assert sched.kv_cache_usage == 0.0
    step(sched, model)
    assert sched.kv_cache_usage == pytest.approx(3 / 10)
    sched.abort_request(seq.request_id)
    assert sched.kv_cache_usage == 0.0


# ----------------------------------------------------------------- stress
@pytest.mark.parametrize("seed", range(40))
def test_randomised_stress(seed: int) -> None:
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4, 8])
    max_model_len = rng.randint(8, 48)
    chunked = rng.random() < 0.75
    budget = rng.randint(1, 40) if chunked else max_model_len + rng.randint(0, 8)
    num_blocks = rng.randint(-(-max_model_len // block_size), 3 * (-(-max_model_len // block_size)))
    sched = make_scheduler(block_size=block_size, num_blocks=num_blocks, max_num_seqs=rng.randint(1, 6),
                           max_num_batched_tokens=budget, max_model_len=max_model_len,
                           chunked=chunked, prefix_caching=rng.random() < 0.8,
                           eos={EOS, rng.randrange(1, VOCAB)})
    prefixes = [rand_prompt(rng, rng.randint(0, max_model_len - 1)) for _ in range(3)]
    model = FakeModel(sched)
    seqs: list[Sequence] = []
    aborted: set[int] = set()

    def new_seq() -> Sequence:
        prompt = (rng.choice(prefixes) + rand_prompt(rng, rng.randint(1, 10)))[:max_model_len]
        return make_seq(prompt, max_tokens=rng.choice([None, rng.randint(1, 20)]),
                        min_tokens=rng.randint(0, 3), ignore_eos=rng.random() < 0.2,
                        stop_token_ids=rng.sample(range(1, VOCAB), rng.randint(0, 3)))

    steps = 0
    while len(seqs) < 30 or sched.has_unfinished():
        for _ in range(rng.randint(0, 3) if len(seqs) < 30 else 0):
            seqs.append(new_seq())
            sched.add_seq(seqs[-1])
        if rng.random() < 0.05 and (sched.running or sched.waiting):
            victim = rng.choice([*sched.running, *sched.waiting])
            aborted.add(id(victim))
            assert sched.abort_request(victim.request_id) == [victim]
            sched.check_invariants()
        if sched.has_unfinished():
            step(sched, model)
        steps += 1
        assert steps < 20000
    assert sched.block_manager.num_free_blocks == num_blocks
    for seq in seqs:
        if id(seq) in aborted:
            assert seq.status is SequenceStatus.FINISHED_ABORTED
        else:
            assert_matches_reference(sched, seq)
