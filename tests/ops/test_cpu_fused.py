"""cpu_fused: the C++ kernels of a decode step's small ops against the reference kernels of
ops/cpu.py (fresh random inputs, odd shapes, strided views), their hand-offs to the reference,
their selection and their errors."""
from __future__ import annotations

import shutil

import pytest
import torch

from ascend_llm.ops import AttentionMetadata, build_op_set, cpu, cpu_fused
from tests.ops.paged_layout import scatter_tables

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="no C++ compiler on this machine: the kernels cannot be built")

TOL = dict(rtol=1e-5, atol=1e-5)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_builds_here():
    assert cpu_fused.extension_unavailable() is None


@pytest.mark.parametrize("rows", [1, 3, 70])
@pytest.mark.parametrize("hidden", [576, 37])
def test_rms_norms_match_reference(rows, hidden):
    g = _gen(rows * 100 + hidden)
    x, residual = torch.randn(rows, hidden, generator=g), torch.randn(rows, hidden, generator=g)
    weight = torch.rand(hidden, generator=g) + 0.5
    torch.testing.assert_close(cpu_fused.rms_norm(x, weight, 1e-6), cpu.rms_norm(x, weight, 1e-6), **TOL)
    normed, summed = cpu_fused.add_rms_norm(x, residual, weight, 1e-5)
    want_normed, want_summed = cpu.add_rms_norm(x, residual, weight, 1e-5)
    torch.testing.assert_close(normed, want_normed, **TOL)
    assert torch.equal(summed, want_summed)
    # float64 ground truth
    x64 = (x + residual).double()
    truth = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.double()
    torch.testing.assert_close(normed.double(), truth, **TOL)


@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (4, 4, 10)])
def test_rope_on_views_of_the_qkv_projection_matches_reference(tokens, heads, kv_heads, head_dim):
    g = _gen(tokens + heads + head_dim)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim)   # strided views
    angles = torch.rand(tokens, 1, head_dim // 2, generator=g) * 6
    cos = torch.cat((angles.cos(), angles.cos()), -1)
    sin = torch.cat((-angles.sin(), angles.sin()), -1)
    got_q, got_k = cpu_fused.rope(q, k, cos, sin)
    want_q, want_k = cpu.rope(q, k, cos, sin)
    torch.testing.assert_close(got_q, want_q, **TOL)
    torch.testing.assert_close(got_k, want_k, **TOL)
    assert got_q.shape == q.shape and got_k.shape == k.shape


@pytest.mark.parametrize("rows, d", [(1, 1536), (7, 13)])
def test_silu_and_mul_matches_reference(rows, d):
    x = torch.randn(rows, 2 * d, generator=_gen(d)) * 4
    torch.testing.assert_close(cpu_fused.silu_and_mul(x), cpu.silu_and_mul(x.clone()), **TOL)


def test_silu_and_mul_far_out_in_both_tails():
    # the vectorised exp clamps its argument: silu(-100) must still be ~0 and silu(100) ~100
    gate = torch.tensor([[-100.0, -88.5, -30.0, -1e-3, 0.0, 1e-3, 30.0, 88.5, 100.0, 3.0, -3.0, 0.5,
                          -0.5, 15.0, -15.0, 7.0]])
    x = torch.cat((gate, torch.full_like(gate, 1.5)), -1)
    got = cpu_fused.silu_and_mul(x)
    truth = (gate.double() * torch.sigmoid(gate.double()) * 1.5).float()
    torch.testing.assert_close(got, truth, rtol=1e-6, atol=1e-30)
    assert torch.isfinite(got).all()


def test_reshape_and_cache_writes_the_same_slots_as_reference():
    g = _gen(3)
    kv = torch.randn(3, 2 * 2 * 8, generator=g)
    key, value = (t.view(3, 2, 8) for t in kv.split([16, 16], dim=-1))      # strided views
    k_cache, v_cache = torch.randn(5, 4, 2, 8, generator=g), torch.randn(5, 4, 2, 8, generator=g)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    slots = torch.tensor([9, 0, 19])
    cpu_fused.reshape_and_cache(key, value, k_cache, v_cache, slots)
    cpu.reshape_and_cache(key, value, ref_k, ref_v, slots)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
    with pytest.raises(RuntimeError, match="slot 20 outside the cache"):
        cpu_fused.reshape_and_cache(key, value, k_cache, v_cache, torch.tensor([0, 1, 20]))


def _paged_case(query_lens, context_lens, heads, kv_heads, head_dim, block_size, seed):
    g = _gen(seed)
    num_blocks = sum(-(-c // block_size) for c in context_lens) + 3
    k_cache = torch.randn(num_blocks + 1, block_size, kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks + 1, block_size, kv_heads, head_dim, generator=g)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, slots = scatter_tables(query_lens, context_lens, block_size, perm)
    query = torch.randn(sum(query_lens), heads, head_dim, generator=g)
    meta = AttentionMetadata.build(query_lens, context_lens, tables, slots, block_size, num_blocks,
                                   torch.device("cpu"))
    return query, k_cache, v_cache, meta


@pytest.mark.parametrize("context_lens", [[1], [37], [5, 17, 33, 1]])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (4, 4, 16), (6, 2, 20)])
@pytest.mark.parametrize("block_size", [4, 16])
def test_decode_attention_matches_reference(context_lens, heads, kv_heads, head_dim, block_size):
    query, k_cache, v_cache, meta = _paged_case([1] * len(context_lens), context_lens, heads, kv_heads,
                                                head_dim, block_size, seed=sum(context_lens) + heads)
    got = cpu_fused.paged_attention(query, k_cache, v_cache, meta, head_dim ** -0.5)
    want = cpu.paged_attention(query, k_cache, v_cache, meta, head_dim ** -0.5)
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("context_lens", [[65], [129, 7], [600, 64, 2000, 1]])
@pytest.mark.parametrize("block_size", [16, 5])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (4, 2, 128), (6, 3, 72), (3, 1, 20)])
def test_decode_attention_over_several_chunks_matches_reference(context_lens, block_size, heads, kv_heads, head_dim):
    # contexts above 64 tokens are split into chunks whose partial softmaxes are merged; head_dim
    # 64 / 128 / 72 take the vectorised paths (64 columns in registers, then 8 at a time), 20 the scalar tail
    query, k_cache, v_cache, meta = _paged_case([1] * len(context_lens), context_lens, heads, kv_heads, head_dim,
                                                block_size, seed=sum(context_lens) + block_size + head_dim)
    query = query * 3       # sharper softmax: the chunk maxima differ
    got = cpu_fused.paged_attention(query, k_cache, v_cache, meta, 0.125)
    want = cpu.paged_attention(query, k_cache, v_cache, meta, 0.125)
    torch.testing.assert_close(got, want, **TOL)


def test_decode_attention_of_a_sequence_does_not_depend_on_its_batch():
    # bitwise: greedy decoding must give the same tokens alone and batched
    query, k_cache, v_cache, meta = _paged_case([1] * 3, [300, 70, 1000], 9, 3, 64, 16, seed=5)
    batched = cpu_fused.paged_attention(query, k_cache, v_cache, meta, 0.125)
    alone_meta = AttentionMetadata.build([1], [1000], meta.block_tables[2:].tolist(), meta.slot_mapping[2:].tolist(),
                                         16, k_cache.shape[0], torch.device("cpu"))
    alone = cpu_fused.paged_attention(query[2:], k_cache, v_cache, alone_meta, 0.125)
    assert torch.equal(alone, batched[2:])


def test_decode_attention_is_the_same_on_one_and_two_threads():
    query, k_cache, v_cache, meta = _paged_case([1] * 4, [50, 3, 640, 20], 9, 3, 64, 16, seed=7)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_fused.paged_attention(query, k_cache, v_cache, meta, 0.125)
        torch.set_num_threads(2)
        two = cpu_fused.paged_attention(query, k_cache, v_cache, meta, 0.125)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)


def test_longer_queries_and_other_dtypes_go_to_the_reference():
    query, k_cache, v_cache, meta = _paged_case([4, 1], [12, 30], 6, 2, 16, 4, seed=11)
    got = cpu_fused.paged_attention(query, k_cache, v_cache, meta, 0.25)
    assert torch.equal(got, cpu.paged_attention(query, k_cache, v_cache, meta, 0.25))
    x = torch.randn(3, 40, generator=_gen(1)).bfloat16()
    weight = torch.rand(40, generator=_gen(2)).bfloat16()
    assert torch.equal(cpu_fused.rms_norm(x, weight, 1e-6), cpu.rms_norm(x, weight, 1e-6))
    assert torch.equal(cpu_fused.silu_and_mul(x), cpu.silu_and_mul(x.clone()))


def test_traced_calls_record_plain_torch_ops():
    weight = torch.rand(24) + 0.5
    traced = torch.jit.trace(lambda x: cpu_fused.rms_norm(x, weight, 1e-6), torch.randn(2, 24))
    assert "ascend_llm_cpu" not in str(traced.graph)
    x = torch.randn(3, 24, generator=_gen(5))
    torch.testing.assert_close(traced(x), cpu.rms_norm(x, weight, 1e-6))


def test_bad_block_tables_are_named():
    query, k_cache, v_cache, meta = _paged_case([1], [9], 4, 2, 8, 4, seed=2)
    tables = meta.block_tables.clone()
    tables[0, 1] = k_cache.shape[0] + 5
    with pytest.raises(RuntimeError, match="outside the cache"):
        torch.ops.ascend_llm_cpu.decode_attention(query, k_cache, v_cache, tables, meta.context_lens, 0.3)
    with pytest.raises(RuntimeError, match="does not fit"):
        torch.ops.ascend_llm_cpu.decode_attention(query, k_cache, v_cache, meta.block_tables,
                                                  torch.tensor([1000]), 0.3)
    with pytest.raises(RuntimeError, match="not a multiple"):
        torch.ops.ascend_llm_cpu.decode_attention(torch.randn(1, 3, 8), k_cache, v_cache, meta.block_tables,
                                                  meta.context_lens, 0.3)


_OPS = ("rms_norm", "add_rms_norm", "rope", "silu_and_mul", "reshape_and_cache", "paged_attention")


def test_selected_by_default_and_stepped_aside(monkeypatch):
    monkeypatch.delenv("ASCEND_LLM_DISABLE_KERNELS", raising=False)
    ops = build_op_set("cpu")
    assert [ops.select(op).name for op in _OPS] == [f"cpu.fused_{op}" for op in _OPS]
    assert ops.select("paged_attention", kv_cache_dtype="int8").name != "cpu.fused_paged_attention"
    monkeypatch.setenv("ASCEND_LLM_DISABLE_KERNELS", "cpu.fused_rope,cpu.fused_paged_attention")
    assert ops.select("rope").name == "cpu.rope"
    assert ops.select("paged_attention").name == "cpu.paged_attention"
    monkeypatch.delenv("ASCEND_LLM_DISABLE_KERNELS")
    monkeypatch.setattr(cpu_fused, "extension_unavailable", lambda: "not built (test)")
    assert [ops.select(op).name for op in _OPS] == [f"cpu.{op}" for op in _OPS]
