"""Shared by the paged-attention tests: block tables scattered over the cache."""
from __future__ import annotations


def scatter_tables(query_lens: list[int], context_lens: list[int], block_size: int,
                   perm: list[int]) -> tuple[list[list[int]], list[int]]:
    """Each sequence takes its blocks from `perm` in turn; returns (block tables, the flat cache
    slots of every sequence's new tokens, which sit at the end of its context)."""
    tables, slots, start = [], [], 0
    for ql, cl in zip(query_lens, context_lens):
        n = -(-cl // block_size)
        table, start = perm[start:start + n], start + n
        tables.append(table)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(cl - ql, cl)]
    return tables, slots
