"""Quantized KV-cache kernels (cpu_kv_quant) against the float reference kernels, fresh random inputs."""
from __future__ import annotations

import pytest
import torch

from ascend_llm.ops import AttentionMetadata, build_registry
from ascend_llm.ops import cpu
from ascend_llm.ops.attention_metadata import KVCacheScales
from ascend_llm.ops.cpu_kv_quant import dequantize_kv, quantize_kv

BLOCK_SIZE, HEAD_DIM, NUM_BLOCKS = 4, 16, 40
STORAGE = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
           "fp8_e5m2": torch.float8_e5m2, "int8": torch.int8}
# (query_lens, context_lens): mixed chunked prefill + decode, and ragged decode (null-block padding)
LAYOUTS = [([4, 1, 9], [12, 30, 9]), ([1, 1, 1], [5, 17, 33])]


def _metadata(query_lens, context_lens):
    perm = torch.randperm(NUM_BLOCKS).tolist()
    tables, ctx_slots, start = [], [], 0
    for cl in context_lens:
        n = -(-cl // BLOCK_SIZE)
        table, start = perm[start:start + n], start + n
        tables.append(table)
        ctx_slots.append([table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(cl)])
    new_slots = [s for slots, ql in zip(ctx_slots, query_lens) for s in slots[len(slots) - ql:]]
    meta = AttentionMetadata.build(query_lens, context_lens, tables, new_slots, BLOCK_SIZE, NUM_BLOCKS,
                                   torch.device("cpu"))
    return meta, torch.tensor([s for slots in ctx_slots for s in slots])


def _scales(kv_cache_dtype, c8, key, value, shrink=1.0):
    """Scales from the data, as a calibrated checkpoint has them; shrink < 1 forces saturation."""
    if kv_cache_dtype == "fp8_e5m2":
        return KVCacheScales(torch.ones(1), torch.ones(1))
    if c8:                                   # msModelSlim C8: per channel, asymmetric
        k_scale, k_offset = _asymmetric(key, shrink)
        v_scale, v_offset = _asymmetric(value, shrink)
        return KVCacheScales(k_scale, v_scale, k_offset, v_offset)
    bound = 127.0 if kv_cache_dtype == "int8" else 448.0
    return KVCacheScales((key.abs().amax() * shrink / bound).reshape(1),
                         (value.abs().amax() * shrink / bound).reshape(1))


def _asymmetric(x, shrink):
    """Per-channel [num_kv_heads, head_dim] scale = (max - min) / 255, offset = round(-min / scale) - 128."""
    lo, hi = x.amin(0).clamp(max=0) * shrink, x.amax(0).clamp(min=0) * shrink
    scale = (hi - lo) / 255
    return scale, torch.round(-lo / scale) - 128


def _run_both(kv_cache_dtype, c8, num_heads, num_kv_heads, layout, shrink=1.0):
    """Write the whole context with each kernel pair, attend; returns what the checks need."""
    registry = build_registry(("cpu",))
    write = registry.select("reshape_and_cache", "cpu", kv_cache_dtype=kv_cache_dtype).run
    attend = registry.select("paged_attention", "cpu", kv_cache_dtype=kv_cache_dtype).run
    query_lens, context_lens = layout
    meta, all_slots = _metadata(query_lens, context_lens)
    key = torch.randn(all_slots.numel(), num_kv_heads, HEAD_DIM)
    value = torch.randn_like(key)
    query = torch.randn(sum(query_lens), num_heads, HEAD_DIM)
    scales = _scales(kv_cache_dtype, c8, key, value, shrink)
    shape = (NUM_BLOCKS + 1, BLOCK_SIZE, num_kv_heads, HEAD_DIM)
    qk, qv = torch.zeros(shape, dtype=STORAGE[kv_cache_dtype]), torch.zeros(shape, dtype=STORAGE[kv_cache_dtype])
    fk, fv = torch.zeros(shape), torch.zeros(shape)
    write(key, value, qk, qv, all_slots, scales)
    cpu.reshape_and_cache(key, value, fk, fv, all_slots)
    got = attend(query, qk, qv, meta, HEAD_DIM ** -0.5, scales)
    float_out = cpu.paged_attention(query, fk, fv, meta, HEAD_DIM ** -0.5)
    return got, float_out, (key, value, query, qk, qv, all_slots, meta, scales)


def _expected_codes(x, dtype, scale, offset):
    """Independent formulation: fp8 satfinite cast / int8 round-half-even + clamp."""
    y = x / scale
    if dtype == torch.int8:
        y = y + (0 if offset is None else offset)
        return torch.clamp(torch.round(y), -128, 127).to(torch.int8)
    limit = torch.finfo(dtype).max
    return torch.clamp(y, -limit, limit).to(dtype)


CASES = [("fp8", False), ("fp8_e4m3", False), ("fp8_e5m2", False), ("int8", False), ("int8", True)]


@pytest.mark.parametrize("kv_cache_dtype, c8", CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (6, 2)])
def test_cache_codes_and_attention_over_dequantized_cache(kv_cache_dtype, c8, layout, num_heads, num_kv_heads):
    torch.manual_seed(hash((kv_cache_dtype, c8, len(layout[0]), num_heads)) % 2**31)
    got, _, (key, value, query, qk, qv, slots, meta, scales) = _run_both(
        kv_cache_dtype, c8, num_heads, num_kv_heads, layout, shrink=0.7)   # 0.7: some values saturate
    dtype = STORAGE[kv_cache_dtype]
    codes_k = qk.view(-1, num_kv_heads, HEAD_DIM)[slots]
    codes_v = qv.view(-1, num_kv_heads, HEAD_DIM)[slots]
    # stored bytes are exactly the quantized values
    want_k = _expected_codes(key, dtype, scales.k_scale, scales.k_offset)
    want_v = _expected_codes(value, dtype, scales.v_scale, scales.v_offset)
    assert torch.equal(codes_k.view(torch.uint8), want_k.view(torch.uint8))
    assert torch.equal(codes_v.view(torch.uint8), want_v.view(torch.uint8))
    # attention equals float attention over the hand-dequantized cache (same fp32 math: tight)
    k_off = 0 if scales.k_offset is None else scales.k_offset
    v_off = 0 if scales.v_offset is None else scales.v_offset
    deq_k = (qk.float() - k_off) * scales.k_scale
    deq_v = (qv.float() - v_off) * scales.v_scale
    want = cpu.paged_attention(query, deq_k, deq_v, meta, HEAD_DIM ** -0.5)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


# (max, mean) |quantized - float| attention output with K/V/Q ~ N(0, 1), head_dim 16, scales from the
# data (no clipping). e4m3 keeps 3 mantissa bits (<= 6.25% relative per element), e5m2 2 bits (12.5%);
# int8 steps are amax/127 (~0.03) or (max-min)/255 per channel for C8. Observed worst over 30 seeds:
# fp8 0.14 / 0.014, e5m2 0.38 / 0.029, int8 0.031 / 0.005, C8 0.021 / 0.003; bounds leave ~40% margin.
QUALITY_TOL = {("fp8", False): (0.2, 0.02), ("fp8_e4m3", False): (0.2, 0.02), ("fp8_e5m2", False): (0.5, 0.04),
               ("int8", False): (0.05, 0.008), ("int8", True): (0.035, 0.005)}


@pytest.mark.parametrize("kv_cache_dtype, c8", CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_quantized_attention_close_to_float(kv_cache_dtype, c8, layout):
    torch.manual_seed(100 + len(layout[0]) + 10 * layout[0][0])
    got, float_out, _ = _run_both(kv_cache_dtype, c8, 6, 2, layout)
    err = (got - float_out).abs()
    max_tol, mean_tol = QUALITY_TOL[(kv_cache_dtype, c8)]
    assert err.max() < max_tol and err.mean() < mean_tol, (err.max(), err.mean())


def test_quantize_saturates_instead_of_overflowing():
    x = torch.tensor([[[1000.0, -1000.0, 0.5, 0.0]]])
    one = torch.ones(1)
    assert quantize_kv(x, torch.float8_e4m3fn, one).float().flatten().tolist() == [448.0, -448.0, 0.5, 0.0]
    assert quantize_kv(x, torch.int8, one).flatten().tolist() == [127, -128, 0, 0]
    assert quantize_kv(x, torch.int8, one, torch.full((1,), 3.0)).flatten().tolist() == [127, -128, 4, 3]


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.int8])
def test_zero_bytes_dequantize_finite(dtype):
    """Untouched blocks and the null block hold zero bytes; they must never become NaN/inf."""
    zeros = torch.zeros(2, 4, 2, 8, dtype=dtype)
    offset = torch.randint(-128, 128, (2, 8)).float() if dtype == torch.int8 else None
    out = dequantize_kv(zeros, torch.rand(2, 8) + 0.1, offset, torch.float32)
    assert torch.isfinite(out).all()


def test_selection_by_kv_cache_dtype_and_rejection_reasons(monkeypatch):
    registry = build_registry(("cpu",))
    for op in ("reshape_and_cache", "paged_attention"):
        float_kernels = (f"cpu.{op}", f"cpu.fused_{op}")         # float path: reference or fused C++
        assert registry.select(op, "cpu").name in float_kernels
        assert registry.select(op, "cpu", kv_cache_dtype="auto").name in float_kernels
        assert registry.select(op, "cpu", kv_cache_dtype="int8").name == f"cpu.kv_quant.{op}"
    monkeypatch.setenv("ASCEND_LLM_DISABLE_KERNELS", "cpu.kv_quant.paged_attention")
    with pytest.raises(ValueError, match="disabled.*kv_cache_dtype='fp8' is quantized"):
        registry.select("paged_attention", "cpu", kv_cache_dtype="fp8")
