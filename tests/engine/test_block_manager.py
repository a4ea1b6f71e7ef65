"""BlockManager: ref counts, prefix caching by chained hash, LRU eviction, failure atomicity."""
from __future__ import annotations

import random

import pytest

from ascend_llm.engine.block_manager import BlockManager, hash_block_tokens
from ascend_llm.engine.sequence import Sequence, SequenceStatus
from tests.engine.fakes import make_seq


def admit(bm: BlockManager, seq: Sequence) -> bool:
    """What the scheduler does for a waiting sequence: prefix lookup, then blocks for all tokens."""
    bm.allocate_prefix(seq)
    if bm.ensure_slots(seq, seq.num_tokens):
        return True
    bm.rollback_prefix(seq)
    return False


def compute_all(bm: BlockManager, seq: Sequence) -> None:
    """Pretend the model computed every token of seq, and register its full blocks."""
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_blocks(seq, seq.num_computed_tokens)


def snapshot(bm: BlockManager) -> tuple:
    return ([bm.ref_count(b) for b in range(bm.num_blocks)], list(bm._free), dict(bm._cached),
            {k: list(v) for k, v in bm._seq_hashes.items()}, bm.num_prefix_queries_tokens,
            bm.num_prefix_hit_tokens)


# ---------------------------------------------------------------------------- basics
def test_constructor_validates() -> None:
    with pytest.raises(ValueError):
        BlockManager(0, 4)
    with pytest.raises(ValueError):
        BlockManager(4, 0)


def test_allocate_and_free_ref_counts() -> None:
    bm = BlockManager(8, 4)
    seq = make_seq(list(range(10)))
    assert admit(bm, seq)
    assert len(seq.block_table) == 3
    assert all(bm.ref_count(b) == 1 for b in seq.block_table)
    assert bm.num_free_blocks == 5
    assert bm.usage == pytest.approx(3 / 8)
    bm.check_invariants([seq])
    blocks = list(seq.block_table)
    bm.free(seq)
    assert seq.block_table == []
    assert all(bm.ref_count(b) == 0 for b in blocks)
    assert bm.num_free_blocks == 8 and bm.usage == 0.0
    bm.check_invariants([])


def test_ensure_slots_grows_incrementally() -> None:
    bm = BlockManager(8, 4)
    seq = make_seq([1, 2, 3])
    bm.allocate_prefix(seq)
    assert bm.ensure_slots(seq, 1) and len(seq.block_table) == 1
    assert bm.ensure_slots(seq, 4) and len(seq.block_table) == 1
    assert bm.ensure_slots(seq, 5) and len(seq.block_table) == 2
    assert bm.ensure_slots(seq, 2) and len(seq.block_table) == 2     # never shrinks
    assert bm.ensure_slots(seq, 0) and len(seq.block_table) == 2
    assert bm.ensure_slots(seq, 32) and len(seq.block_table) == 8
    assert bm.num_free_blocks == 0 and bm.usage == 1.0
    bm.check_invariants([seq])


def test_can_allocate_and_blocks_needed() -> None:
    bm = BlockManager(4, 4)
    assert bm.can_allocate(4) and not bm.can_allocate(5)
    assert [bm.blocks_needed(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_ensure_slots_failure_leaves_state_unchanged() -> None:
    bm = BlockManager(4, 4)
    a = make_seq(list(range(12)))
    assert admit(bm, a)
    compute_all(bm, a)
    b = make_seq(list(range(100, 105)))
    bm.allocate_prefix(b)
    assert bm.ensure_slots(b, 4)
    before, table_before = snapshot(bm), list(b.block_table)
    assert not bm.ensure_slots(b, 9)                  # needs 2 more blocks, 0 free
    assert snapshot(bm) == before and b.block_table == table_before
    c = make_seq(list(range(200, 220)))
    bm.allocate_prefix(c)
    before = snapshot(bm)
    assert not bm.ensure_slots(c, 20)
    assert c.block_table == [] and snapshot(bm) == before
    bm.check_invariants([a, b])


def test_free_twice_is_harmless_and_overfree_detected() -> None:
    bm = BlockManager(4, 2)
    seq = make_seq([1, 2, 3])
    assert admit(bm, seq)
    bm.free(seq)
    bm.free(seq)
    bm.check_invariants([])
    seq.block_table = [0]                              # a block nobody holds
    with pytest.raises(RuntimeError):
        bm.free(seq)


def test_allocate_prefix_requires_waiting_seq_without_blocks() -> None:
    bm = BlockManager(4, 2)
    seq = make_seq([1, 2, 3])
    assert admit(bm, seq)
    with pytest.raises(ValueError):
        bm.allocate_prefix(seq)
    bm.free(seq)
    seq.status = SequenceStatus.RUNNING
    with pytest.raises(ValueError):
        bm.allocate_prefix(seq)


# ---------------------------------------------------------------------- prefix caching
def test_hash_chain_depends_on_whole_prefix() -> None:
    assert hash_block_tokens(None, [1, 2]) == hash_block_tokens(None, [1, 2])
    assert hash_block_tokens(None, [1, 2]) != hash_block_tokens(None, [2, 1])
    first_a, first_b = hash_block_tokens(None, [1, 2]), hash_block_tokens(None, [3, 4])
    assert hash_block_tokens(first_a, [5, 6]) != hash_block_tokens(first_b, [5, 6])
    assert hash_block_tokens(None, [5, 6]) != hash_block_tokens(first_a, [5, 6])


def test_prefix_hit_after_cache_and_free() -> None:
    bm = BlockManager(8, 4)
    a = make_seq(list(range(10)))
    assert admit(bm, a)
    compute_all(bm, a)
    assert bm.num_cached_blocks == 2                   # the partial third block is not cached
    a_blocks = list(a.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 8                     # evictable blocks count as free
    assert bm.num_cached_blocks == 2
    b = make_seq(list(range(9)) + [99, 98])
    bm.allocate_prefix(b)
    assert b.block_table == a_blocks[:2]
    assert b.num_computed_tokens == b.num_cached_tokens == 8
    assert all(bm.ref_count(blk) == 1 for blk in b.block_table)
    assert bm.num_free_blocks == 6                     # revived blocks left the free queue
    assert bm.num_prefix_queries_tokens == 10 + 11
    assert bm.num_prefix_hit_tokens == 8
    assert bm.prefix_hit_rate == pytest.approx(8 / 21)
    assert bm.ensure_slots(b, b.num_tokens) and len(b.block_table) == 3
    bm.check_invariants([b])


def test_prefix_match_stops_at_first_differing_block() -> None:
    bm = BlockManager(16, 4)
    a = make_seq(list(range(16)))
    assert admit(bm, a)
    compute_all(bm, a)
    b = make_seq(list(range(4)) + [77] + list(range(5, 16)) + [1])
    bm.allocate_prefix(b)
    assert b.block_table == a.block_table[:1] and b.num_computed_tokens == 4
    c = make_seq([77] + list(range(1, 17)))
    bm.allocate_prefix(c)
    assert c.block_table == [] and c.num_computed_tokens == 0
    bm.check_invariants([a, b, c])


def test_never_matches_entire_sequence() -> None:
    bm = BlockManager(8, 4)
    a = make_seq(list(range(8)))
    assert admit(bm, a)
    compute_all(bm, a)
    assert bm.num_cached_blocks == 2
    bm.free(a)
    same = make_seq(list(range(8)))
    bm.allocate_prefix(same)
    assert len(same.block_table) == 1 and same.num_computed_tokens == 4
    assert same.num_uncomputed_tokens == 4
    longer = make_seq(list(range(9)))
    bm.allocate_prefix(longer)
    assert len(longer.block_table) == 2 and longer.num_computed_tokens == 8
    tiny = make_seq([0])
    bm.allocate_prefix(tiny)
    assert tiny.block_table == [] and tiny.num_computed_tokens == 0
    bm.check_invariants([same, longer, tiny])


def test_two_live_sequences_share_prefix() -> None:
    bm = BlockManager(8, 4)
    a = make_seq(list(range(10)))
    assert admit(bm, a)
    compute_all(bm, a)
    b = make_seq(list(range(8)) + [50, 51, 52])
    assert admit(bm, b)
    shared = a.block_table[:2]
    assert b.block_table[:2] == shared and b.block_table[2] not in a.block_table
    assert [bm.ref_count(blk) for blk in shared] == [2, 2]
    assert bm.num_free_blocks == 8 - 4
    bm.check_invariants([a, b])
    bm.free(a)
    assert [bm.ref_count(blk) for blk in shared] == [1, 1]
    assert bm.num_free_blocks == 8 - 3
    bm.check_invariants([b])
    bm.free(b)
    assert bm.num_free_blocks == 8
    bm.check_invariants([])


def test_output_tokens_are_cached_too() -> None:
    bm = BlockManager(8, 4)
    a = make_seq([1, 2, 3])
    assert admit(bm, a)
    compute_all(bm, a)
    assert bm.num_cached_blocks == 0
    for token in (4, 5, 6):                             # decode: one token per step
        a.append_token(token)
        assert bm.ensure_slots(a, a.num_tokens)
        compute_all(bm, a)
    assert bm.num_cached_blocks == 1
    bm.free(a)
    b = make_seq([1, 2, 3, 4, 5, 6])
    bm.allocate_prefix(b)
    assert b.num_computed_tokens == 4


def test_cache_full_blocks_only_registers_full_computed_blocks() -> None:
    bm = BlockManager(8, 4)
    seq = make_seq(list(range(10)))
    assert admit(bm, seq)
    bm.cache_full_blocks(seq, 3)
    assert bm.num_cached_blocks == 0
    bm.cache_full_blocks(seq, 5)
    assert bm.num_cached_blocks == 1
    bm.cache_full_blocks(seq, 8)
    assert bm.num_cached_blocks == 2
    bm.cache_full_blocks(seq, 10)
    assert bm.num_cached_blocks == 2
    bm.cache_full_blocks(seq, 8)                        # idempotent
    assert bm.num_cached_blocks == 2
    bm.check_invariants([seq])


def test_duplicate_content_keeps_first_registered_block() -> None:
    bm = BlockManager(8, 4)
    a, b = make_seq(list(range(6))), make_seq(list(range(6)))
    assert admit(bm, a) and admit(bm, b)               # b admitted before a's blocks were cached
    assert a.block_table[0] != b.block_table[0]
    compute_all(bm, a)
    compute_all(bm, b)
    assert bm.num_cached_blocks == 1
    bm.check_invariants([a, b])
    first = a.block_table[0]
    bm.free(b)
    bm.free(a)
    c = make_seq(list(range(6)))
    bm.allocate_prefix(c)
    assert c.block_table == [first]


def test_eviction_prefers_unhashed_then_least_recently_freed() -> None:
    bm = BlockManager(4, 2)
    a, b = make_seq([1, 2, 3]), make_seq([5, 6, 7])
    assert admit(bm, a) and admit(bm, b)
    compute_all(bm, a)
    compute_all(bm, b)
    bm.free(a)                                          # a's cached block is the LRU one
    bm.free(b)
    assert bm.num_cached_blocks == 2 and bm.num_free_blocks == 4
    c = make_seq([9] * 4)
    assert admit(bm, c)                                 # takes the two unhashed partial blocks
    assert bm.num_cached_blocks == 2
    d = make_seq([8])
    assert admit(bm, d)                                 # evicts a's block, freed before b's
    assert bm.num_cached_blocks == 1
    probe_a, probe_b = make_seq([1, 2, 3]), make_seq([5, 6, 7])
    bm.allocate_prefix(probe_a)
    bm.allocate_prefix(probe_b)
    assert probe_a.num_computed_tokens == 0
    assert probe_b.num_computed_tokens == 2
    bm.check_invariants([c, d, probe_a, probe_b])


def test_free_in_reverse_order_evicts_tail_first() -> None:
    bm = BlockManager(4, 2)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8])
    assert admit(bm, a)
    compute_all(bm, a)
    assert bm.num_cached_blocks == 4
    bm.free(a)
    filler = make_seq([0])
    assert admit(bm, filler)                            # evicts exactly one block: the tail
    probe = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    bm.allocate_prefix(probe)
    assert probe.num_computed_tokens == 6               # first three blocks still cached
    bm.check_invariants([filler, probe])


def test_revived_block_is_not_evicted_while_in_use() -> None:
    bm = BlockManager(3, 2)
    a = make_seq([1, 2, 3])
    assert admit(bm, a)
    compute_all(bm, a)
    bm.free(a)
    b = make_seq([1, 2, 3, 4])
    assert admit(bm, b)                                 # revives block of [1, 2] + 1 fresh block
    c = make_seq([7, 8])
    assert admit(bm, c)                                 # the last free block
    d = make_seq([9])
    assert not admit(bm, d)
    assert bm.num_cached_blocks == 1
    bm.check_invariants([b, c])


def test_rollback_prefix_restores_counters_and_blocks() -> None:
    bm = BlockManager(4, 2)
    a = make_seq([1, 2, 3, 4, 5])
    assert admit(bm, a)
    compute_all(bm, a)
    bm.free(a)
    before = snapshot(bm)
    b = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11])
    assert not admit(bm, b)                             # hits 2 blocks, needs 4 more
    assert b.block_table == [] and b.num_computed_tokens == b.num_cached_tokens == 0
    after = snapshot(bm)
    assert after[0] == before[0] and after[2:] == before[2:]
    assert sorted(after[1]) == sorted(before[1])
    bm.check_invariants([])


def test_prefix_caching_disabled() -> None:
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    a = make_seq(list(range(10)))
    assert admit(bm, a)
    compute_all(bm, a)
    bm.free(a)
    b = make_seq(list(range(10)))
    bm.allocate_prefix(b)
    assert b.block_table == [] and b.num_computed_tokens == 0
    assert bm.num_cached_blocks == 0
    assert bm.num_prefix_queries_tokens == 0 and bm.prefix_hit_rate == 0.0
    bm.check_invariants([b])


def test_invariant_check_detects_corruption() -> None:
    bm = BlockManager(4, 2)
    a = make_seq([1, 2, 3])
    assert admit(bm, a)
    compute_all(bm, a)
    bm.check_invariants([a])
    with pytest.raises(AssertionError):
        bm.check_invariants([])                         # a's blocks unaccounted for
    bm._blocks[a.block_table[1]].ref_count += 1
    with pytest.raises(AssertionError):
        bm.check_invariants([a])
    bm._blocks[a.block_table[1]].ref_count -= 1
    a.token_ids[0] = 42                                 # cached block no longer matches its tokens
    with pytest.raises(AssertionError):
        bm.check_invariants([a])


@pytest.mark.parametrize("seed", range(10))
def test_random_alloc_free_keeps_invariants(seed: int) -> None:
    rng = random.Random(seed)
    bm = BlockManager(rng.randint(4, 16), rng.choice([1, 2, 4]), enable_prefix_caching=rng.random() < 0.8)
    prefixes = [[rng.randrange(5) for _ in range(rng.randint(0, 12))] for _ in range(3)]
    live: list[Sequence] = []
    for _ in range(300):
        if live and rng.random() < 0.4:
            bm.free(live.pop(rng.randrange(len(live))))
        elif live and rng.random() < 0.5:
            seq = rng.choice(live)
            seq.append_token(rng.randrange(5))
            if bm.ensure_slots(seq, seq.num_tokens):
                compute_all(bm, seq)
            else:
                seq.token_ids.pop()
        else:
            seq = make_seq(rng.choice(prefixes) + [rng.randrange(5) for _ in range(rng.randint(1, 6))])
            if admit(bm, seq):
                assert seq.num_computed_tokens < seq.num_tokens
                compute_all(bm, seq)
                live.append(seq)
        bm.check_invariants(live)
        used = len({blk for seq in live for blk in seq.block_table})
        assert bm.num_free_blocks == bm.num_blocks - used
    for seq in live:
        bm.free(seq)
    bm.check_invariants([])
    assert bm.num_free_blocks == bm.num_blocks
