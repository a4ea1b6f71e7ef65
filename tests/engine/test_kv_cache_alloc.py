"""The paged KV cache starts zeroed even where malloc would recycle old tensors' bytes.

Attention reads whole blocks and masks the unwritten tail of each sequence's last block; a NaN
there turns the masked (zero-weight) products into NaN. A CI run hit exactly this: a large
`torch.empty` cache was served from a freed heap chunk of an earlier test, and the first
sequence's prompt log-probs came out NaN.
"""
from __future__ import annotations

import torch

from ascend_llm.engine.kv_cache import KVCacheSpec, allocate_kv_caches


def _leave_nan_heap_chunk() -> torch.Tensor:
    """Leave ~500 MiB of freed, NaN-filled heap memory in glibc's bins (not trimmed: a live
    allocation sits above it); returns that allocation, which must stay alive."""
    probe = torch.empty(30 * 2**20, dtype=torch.uint8)
    del probe                            # freeing an mmapped chunk raises glibc's mmap threshold to 30 MiB
    chunks = [torch.full((10 * 2**20,), float("nan"), dtype=torch.float16) for _ in range(25)]
    pin = torch.ones(2**18)
    del chunks
    return pin


def test_large_cpu_cache_is_zero_after_heap_reuse():
    pin = _leave_nan_heap_chunk()
    spec = KVCacheSpec(num_layers=4, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float16)
    num_blocks = 200 * 2**20 // spec.bytes_per_block            # 200 MiB: the mmap path
    caches = allocate_kv_caches(spec, num_blocks, torch.device("cpu"))
    assert len(caches) == 4
    for k, v in caches:
        assert k.shape == (num_blocks + 1, 16, 2, 64) and k.dtype == torch.float16
        assert int(torch.count_nonzero(k)) == 0 and int(torch.count_nonzero(v)) == 0
    k0, v0 = caches[0]
    k0[3, 5].fill_(1.5)                  # writable, and layers do not alias
    assert float(k0.sum()) == 1.5 * 2 * 64 and int(torch.count_nonzero(v0)) == 0
    assert int(torch.count_nonzero(caches[1][0])) == 0
    del pin


def test_small_cpu_and_fp8_caches_are_zero():
    for dtype, blocks in ((torch.float32, 7), (torch.float8_e4m3fn, 100_000)):
        spec = KVCacheSpec(num_layers=2, num_kv_heads=1, head_dim=32, block_size=16, dtype=dtype)
        (k, v), _ = allocate_kv_caches(spec, blocks, torch.device("cpu"))
        assert k.dtype == dtype and k.shape == (blocks + 1, 16, 1, 32)
        assert int(torch.count_nonzero(k.view(torch.uint8))) == 0 and int(torch.count_nonzero(v.view(torch.uint8))) == 0
