"""Triton reshape_and_cache + paged attention vs `ops/cpu.py` and `ops/cpu_kv_quant.py`.

One mixed batch: prefills (one with cached prefix: chunked prefill), decodes of different
context lengths, GQA, a head_dim and block size that are not powers of two, blocks scattered
in the cache. Cache writes are bit-exact (float copy, fp8 / int8 quantization); attention
outputs within 2e-5 (fp32; softmax summed in another order) or 2e-3 (fp16).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
from ascend_llm.ops import cpu, cpu_kv_quant  # noqa: E402
from ascend_llm.ops.attention_metadata import AttentionMetadata, KVCacheScales  # noqa: E402
from ascend_llm.ops.triton import paged_attention as pa  # noqa: E402

TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float16: dict(rtol=2e-3, atol=2e-3)}


def _batch(query_lens: list[int], context_lens: list[int], block_size: int, num_blocks: int
           ) -> AttentionMetadata:
    """Random, non-contiguous block tables; the last block is the null (padding) block."""
    perm = torch.randperm(num_blocks - 1).tolist()
    tables, slots = [], []
    for q_len, ctx in zip(query_lens, context_lens):
        table = [perm.pop() for _ in range(-(-ctx // block_size))]
        tables.append(table)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(ctx - q_len, ctx)]
    return AttentionMetadata.build(query_lens, context_lens, tables, slots, block_size,
                                   num_blocks - 1, torch.device("cpu"))


def _meta_on(meta: AttentionMetadata, device: torch.device) -> AttentionMetadata:
    return AttentionMetadata(**{f.name: getattr(meta, f.name).to(device)
                                if isinstance(getattr(meta, f.name), torch.Tensor) else getattr(meta, f.name)
                                for f in dataclasses.fields(meta)})


CASES = {   # name: (query_lens, context_lens, num_heads, num_kv_heads, head_dim, block_size)
    "mixed_gqa": ([5, 1, 1, 3], [5, 9, 2, 11], 4, 2, 24, 4),
    "decode_mqa": ([1, 1, 1], [17, 3, 30], 6, 1, 32, 8),
    "prefill_mha": ([7, 2], [7, 2], 2, 2, 16, 16),
}


def _cache(num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype
           ) -> torch.Tensor:
    return torch.randn(num_blocks, block_size, kv_heads, head_dim).to(dtype)   # stale data everywhere


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_float_cache(seed: int, device: torch.device, case: str, dtype: torch.dtype) -> None:
    query_lens, context_lens, heads, kv_heads, head_dim, block_size = CASES[case]
    num_blocks = sum(-(-c // block_size) for c in context_lens) + 3
    meta = _batch(query_lens, context_lens, block_size, num_blocks)
    tokens = sum(query_lens)
    q = torch.randn(tokens, heads, head_dim).to(dtype)
    k, v = torch.randn(2, tokens, kv_heads, head_dim).to(dtype)
    k_cache, v_cache = (_cache(num_blocks, block_size, kv_heads, head_dim, dtype) for _ in range(2))
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    k_cache, v_cache, meta_dev = k_cache.to(device), v_cache.to(device), _meta_on(meta, device)
    pa.reshape_and_cache(k.to(device), v.to(device), k_cache, v_cache, meta_dev.slot_mapping)
    cpu.reshape_and_cache(k, v, ref_k, ref_v, meta.slot_mapping)
    assert torch.equal(k_cache.cpu(), ref_k) and torch.equal(v_cache.cpu(), ref_v), f"seed {seed}"
    scale = head_dim ** -0.5
    got = pa.paged_attention(q.to(device), k_cache, v_cache, meta_dev, scale).cpu()
    ref = cpu.paged_attention(q, ref_k, ref_v, meta, scale)
    torch.testing.assert_close(got, ref, **TOL[dtype], msg=lambda s: f"seed {seed}: {s}")


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_quantized_cache(seed: int, device: torch.device, kv_cache_dtype: str, per_channel: bool) -> None:
    query_lens, context_lens, heads, kv_heads, head_dim, block_size = CASES["mixed_gqa"]
    num_blocks = 12
    meta = _batch(query_lens, context_lens, block_size, num_blocks)
    tokens = sum(query_lens)
    q = torch.randn(tokens, heads, head_dim)
    k, v = torch.randn(2, tokens, kv_heads, head_dim)
    shape = (kv_heads, head_dim) if per_channel else (1,)
    k_scale, v_scale = torch.rand(shape) * 0.03 + 0.01, torch.rand(shape) * 0.03 + 0.01
    offsets = (None, None)
    if kv_cache_dtype == "int8":                      # msModelSlim C8 zero points
        offsets = (torch.randint(-8, 8, (kv_heads, head_dim)).float(),) * 2
    scales = KVCacheScales(k_scale, v_scale, *offsets)
    cache_dtype = torch.int8 if kv_cache_dtype == "int8" else torch.float8_e4m3fn
    # earlier steps' context: valid codes (random bytes could be e4m3 NaNs)
    k_cache, v_cache = (cpu_kv_quant.quantize_kv(torch.randn(num_blocks, block_size, kv_heads, head_dim),
                                                 cache_dtype, scale, offset)
                        for scale, offset in ((k_scale, offsets[0]), (v_scale, offsets[1])))
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    k_cache, v_cache, meta_dev = k_cache.to(device), v_cache.to(device), _meta_on(meta, device)
    scales_dev = KVCacheScales(*(None if t is None else t.to(device) for t in dataclasses.astuple(scales)))
    pa.reshape_and_cache(k.to(device), v.to(device), k_cache, v_cache, meta_dev.slot_mapping, scales_dev)
    cpu_kv_quant.reshape_and_cache(k, v, ref_k, ref_v, meta.slot_mapping, scales)
    assert torch.equal(k_cache.cpu().view(torch.uint8), ref_k.view(torch.uint8)), f"seed {seed}"
    assert torch.equal(v_cache.cpu().view(torch.uint8), ref_v.view(torch.uint8)), f"seed {seed}"
    got = pa.paged_attention(q.to(device), k_cache, v_cache, meta_dev, 0.2, scales_dev).cpu()
    ref = cpu_kv_quant.paged_attention(q, ref_k, ref_v, meta, 0.2, scales, attend=cpu.paged_attention)
    torch.testing.assert_close(got, ref, **TOL[torch.float32], msg=lambda s: f"seed {seed}: {s}")


def test_rejects_heads_not_multiple_of_kv_heads() -> None:
    meta = _batch([1], [3], 4, 3)
    with pytest.raises(ValueError, match="num_kv_heads"):
        pa.paged_attention(torch.randn(1, 3, 16), torch.randn(3, 4, 2, 16), torch.randn(3, 4, 2, 16), meta, 1.0)


@pytest.mark.parametrize("num_splits", [2, 5])
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_split_kv_decode(seed: int, device: torch.device, num_splits: int, kv_cache_dtype: str) -> None:
    # decode-only batch; 5 splits of the 3-token context leave empty splits (merged with weight 0)
    query_lens, context_lens, heads, kv_heads, head_dim, block_size = [1, 1, 1], [40, 3, 23], 4, 2, 32, 8
    num_blocks = 16
    meta = _batch(query_lens, context_lens, block_size, num_blocks)
    q = torch.randn(3, heads, head_dim)
    cache_dtype = torch.int8 if kv_cache_dtype == "int8" else torch.float32
    scales = KVCacheScales(torch.tensor([0.02]), torch.tensor([0.03])) if kv_cache_dtype == "int8" else None
    k_cache, v_cache = (torch.randn(num_blocks, block_size, kv_heads, head_dim) * 2 for _ in range(2))
    if scales is not None:
        k_cache = cpu_kv_quant.quantize_kv(k_cache, cache_dtype, scales.k_scale)
        v_cache = cpu_kv_quant.quantize_kv(v_cache, cache_dtype, scales.v_scale)
        ref = cpu_kv_quant.paged_attention(q, k_cache, v_cache, meta, 0.3, scales, attend=cpu.paged_attention)
        scales_dev = KVCacheScales(scales.k_scale.to(device), scales.v_scale.to(device))
    else:
        ref = cpu.paged_attention(q, k_cache, v_cache, meta, 0.3)
        scales_dev = None
    got = pa.paged_attention(q.to(device), k_cache.to(device), v_cache.to(device), _meta_on(meta, device),
                             0.3, scales_dev, num_splits=num_splits).cpu()
    torch.testing.assert_close(got, ref, **TOL[torch.float32], msg=lambda s: f"seed {seed}: {s}")


def test_split_kv_needs_a_decode_only_batch() -> None:
    meta = _batch([2], [5], 4, 4)
    cache = torch.randn(4, 4, 1, 16)
    with pytest.raises(ValueError, match="decode-only"):
        pa.paged_attention(torch.randn(2, 1, 16), cache, cache, meta, 1.0, num_splits=2)
