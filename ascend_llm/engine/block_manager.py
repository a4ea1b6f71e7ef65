"""Paged KV-cache block allocator: reference counts and prefix caching by chained block hash.

Pure Python (no torch). A block is *free* when its ref count is 0; a free block that still
carries a hash is an *evictable cached* block: a later request with the same prefix can revive
it, until its slot is handed out for a new allocation (least recently freed first).
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from ascend_llm.engine.sequence import Sequence, SequenceStatus

BlockHash = bytes


def hash_block_tokens(parent_hash: BlockHash | None, token_ids: list[int]) -> BlockHash:
    """Chained hash of one full block: identifies its tokens together with everything before them."""
    digest = hashlib.sha256(parent_hash or b"")
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


@dataclass(slots=True)
class KVBlock:
    """One physical KV-cache block."""
    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


class BlockManager:
    """Hands out KV blocks to sequences and shares full blocks between equal prefixes.

    The free queue is ordered by eviction priority: blocks without a hash come first, then
    cached blocks from least to most recently freed. `num_free_blocks` counts both kinds.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [KVBlock(block_id) for block_id in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[BlockHash, int] = {}
        self._seq_hashes: dict[int, list[BlockHash]] = {}   # seq_id -> hashes of its full blocks
        self.num_prefix_queries_tokens = 0
        self.num_prefix_hit_tokens = 0

    # ----------------------------------------------------------------- stats
    @property
    def num_free_blocks(self) -> int:
        """Blocks with no reference, evictable cached blocks included."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache (in use or evictable)."""
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by at least one sequence."""
        return (self.num_blocks - len(self._free)) / self.num_blocks

    @property
    def prefix_hit_rate(self) -> float:
        """Cumulative fraction of queried tokens served by the prefix cache."""
        if self.num_prefix_queries_tokens == 0:
            return 0.0
        return self.num_prefix_hit_tokens / self.num_prefix_queries_tokens

    def ref_count(self, block_id: int) -> int:
        return self._blocks[block_id].ref_count

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    # ------------------------------------------------------------ allocation
    def allocate_prefix(self, seq: Sequence) -> None:
        """Give a waiting sequence the longest cached chain of its full blocks (never all its tokens)."""
        if seq.block_table or seq.status is not SequenceStatus.WAITING:
            raise ValueError(f"allocate_prefix: seq {seq.seq_id} must be WAITING with no blocks")
        seq.num_computed_tokens = seq.num_cached_tokens = 0
        if not self.enable_prefix_caching:
            return
        # prompt logprobs need logits at every prompt position, so such requests compute it all
        wants_prompt_logprobs = getattr(seq.sampling_params, "prompt_logprobs", None) is not None
        block_ids, hashes = ([], []) if wants_prompt_logprobs else self._match_prefix(seq.token_ids)
        for block_id in block_ids:
            self._acquire(block_id)
        seq.block_table = block_ids
        if hashes:
            self._seq_hashes[seq.seq_id] = hashes
        num_hit = len(block_ids) * self.block_size
        seq.num_computed_tokens = seq.num_cached_tokens = num_hit
        self.num_prefix_queries_tokens += seq.num_tokens
        self.num_prefix_hit_tokens += num_hit

    def rollback_prefix(self, seq: Sequence) -> None:
        """Undo `allocate_prefix` (and any `ensure_slots`) for a sequence that was not admitted."""
        if self.enable_prefix_caching:
            self.num_prefix_queries_tokens -= seq.num_tokens
            self.num_prefix_hit_tokens -= seq.num_cached_tokens
        self.free(seq)
        seq.num_computed_tokens = seq.num_cached_tokens = 0

    def ensure_slots(self, seq: Sequence, num_total_tokens: int) -> bool:
        """Grow `seq.block_table` to hold `num_total_tokens`; False (and no change) if blocks run out."""
        needed = self.blocks_needed(num_total_tokens) - len(seq.block_table)
        if needed <= 0:
            return True
        if needed > len(self._free):
            return False
        seq.block_table.extend(self._allocate_fresh() for _ in range(needed))
        return True

    def cache_full_blocks(self, seq: Sequence, num_computed_tokens: int) -> None:
        """Register hashes of the blocks of `seq` now completely filled with computed tokens."""
        if not self.enable_prefix_caching or not seq.block_table:
            return
        hashes = self._seq_hashes.setdefault(seq.seq_id, [])
        num_full = min(num_computed_tokens // self.block_size, len(seq.block_table))
        size = self.block_size
        while len(hashes) < num_full:
            index = len(hashes)
            parent = hashes[-1] if hashes else None
            block_hash = hash_block_tokens(parent, seq.token_ids[index * size:(index + 1) * size])
            hashes.append(block_hash)
            self._register(seq.block_table[index], block_hash)

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references, tail first so its tail blocks are evicted first."""
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table = []
        self._seq_hashes.pop(seq.seq_id, None)

    # --------------------------------------------------------------- helpers
    def _match_prefix(self, token_ids: list[int]) -> tuple[list[int], list[BlockHash]]:
        size = self.block_size
        max_blocks = (len(token_ids) - 1) // size      # leave at least one token to compute
        block_ids: list[int] = []
        hashes: list[BlockHash] = []
        parent: BlockHash | None = None
        for index in range(max_blocks):
            parent = hash_block_tokens(parent, token_ids[index * size:(index + 1) * size])
            block_id = self._cached.get(parent)
            if block_id is None:
                break
            block_ids.append(block_id)
            hashes.append(parent)
        return block_ids, hashes

    def _acquire(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _allocate_fresh(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self._blocks[block_id]
        if block.block_hash is not None:
            del self._cached[block.block_hash]
            block.block_hash = None
        block.ref_count = 1
        return block_id

    def _release(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref_count <= 0:
            raise RuntimeError(f"block {block_id} freed more often than it was referenced")
        block.ref_count -= 1
        if block.ref_count == 0:
            self._free[block_id] = None
            if block.block_hash is None:               # useless for reuse: hand it out first
                self._free.move_to_end(block_id, last=False)

    def _register(self, block_id: int, block_hash: BlockHash) -> None:
        block = self._blocks[block_id]
        if block_hash in self._cached or block.block_hash is not None:
            return                                     # keep the first block with this content
        block.block_hash = block_hash
        self._cached[block_hash] = block_id

    # ------------------------------------------------------------ invariants
    def check_invariants(self, seqs: Iterable[Sequence]) -> None:
        """Raise AssertionError unless the state is consistent with `seqs`, all block holders."""
        holders = [seq for seq in seqs if seq.block_table]
        counts = [0] * self.num_blocks
        for seq in holders:
            _expect(len(set(seq.block_table)) == len(seq.block_table),
                    f"seq {seq.seq_id} references a block twice: {seq.block_table}")
            for block_id in seq.block_table:
                counts[block_id] += 1
        for block in self._blocks:
            holders_count = counts[block.block_id]
            _expect(block.ref_count == holders_count,
                    f"block {block.block_id}: ref_count {block.ref_count} != {holders_count} holders")
            _expect((block.ref_count == 0) == (block.block_id in self._free),
                    f"block {block.block_id}: free-queue membership disagrees with ref_count")
            _expect(block.block_hash is None or self._cached.get(block.block_hash) == block.block_id,
                    f"block {block.block_id}: hash not mapped back to it")
        for block_hash, block_id in self._cached.items():
            _expect(self._blocks[block_id].block_hash == block_hash, f"stale hash entry for block {block_id}")
        self._check_seq_hashes(holders)

    def _check_seq_hashes(self, holders: list[Sequence]) -> None:
        live_ids = {seq.seq_id for seq in holders}
        _expect(set(self._seq_hashes) <= live_ids, "hash state kept for a sequence without blocks")
        for seq in holders:
            hashes = self._seq_hashes.get(seq.seq_id, [])
            _expect(len(hashes) <= len(seq.block_table), f"seq {seq.seq_id}: more hashes than blocks")
            for index, block_id in enumerate(seq.block_table):
                block_hash = self._blocks[block_id].block_hash
                if block_hash is None:
                    continue
                _expect(index < len(hashes) and hashes[index] == block_hash,
                        f"seq {seq.seq_id}: cached block {block_id} at index {index} holds other content")
            parent: BlockHash | None = None
            for index, block_hash in enumerate(hashes):
                tokens = seq.token_ids[index * self.block_size:(index + 1) * self.block_size]
                parent = hash_block_tokens(parent, tokens)
                _expect(parent == block_hash, f"seq {seq.seq_id}: hash {index} does not match its tokens")
