"""CPU reference kernels against naive, obviously-correct formulations (fresh random inputs)."""
from __future__ import annotations

import pytest
import torch

from ascend_llm.ops import AttentionMetadata, build_registry
from ascend_llm.ops import cpu
from ascend_llm.ops.registry import Kernel, OpRegistry
from tests.ops.paged_layout import scatter_tables


def naive_attention(q, k, v, scale):
    """q [Lq, H, D], k/v [Lk, Hkv, D]; query i sits at key position Lk - Lq + i."""
    lq, h, _ = q.shape
    lk, hkv, _ = k.shape
    k = k.repeat_interleave(h // hkv, dim=1)
    v = v.repeat_interleave(h // hkv, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    q_pos = torch.arange(lk - lq, lk).unsqueeze(1)
    scores = scores.masked_fill(torch.arange(lk).unsqueeze(0) > q_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("query_lens, context_lens", [
    ([1, 1, 1], [5, 17, 33]),            # decode, ragged contexts
    ([7], [7]),                          # fresh prefill
    ([4, 1, 9], [12, 30, 9]),            # mixed chunked prefill + decode
    ([1], [1]),
])
@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (6, 2)])
def test_paged_attention_matches_naive(query_lens, context_lens, num_heads, num_kv_heads):
    torch.manual_seed(sum(query_lens) + num_heads)
    block_size, head_dim, num_blocks = 4, 16, 40
    k_cache = torch.randn(num_blocks + 1, block_size, num_kv_heads, head_dim)
    v_cache = torch.randn_like(k_cache)
    k_cache[num_blocks] = 0
    v_cache[num_blocks] = 0
    perm = torch.randperm(num_blocks).tolist()
    tables, slots = scatter_tables(query_lens, context_lens, block_size, perm)
    query = torch.randn(sum(query_lens), num_heads, head_dim)
    meta = AttentionMetadata.build(query_lens, context_lens, tables, slots, block_size, num_blocks, torch.device("cpu"))
    got = cpu.paged_attention(query, k_cache, v_cache, meta, head_dim ** -0.5)
    flat_k = k_cache.view(-1, num_kv_heads, head_dim)
    flat_v = v_cache.view(-1, num_kv_heads, head_dim)
    offset = 0
    for ql, cl, table in zip(query_lens, context_lens, tables):
        ctx_slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(cl)])
        want = naive_attention(query[offset:offset + ql], flat_k[ctx_slots], flat_v[ctx_slots], head_dim ** -0.5)
        assert torch.allclose(got[offset:offset + ql], want, atol=1e-5), (got[offset:offset + ql] - want).abs().max()
        offset += ql


def test_reshape_and_cache_writes_slots():
    k_cache = torch.zeros(3, 4, 2, 8)
    v_cache = torch.zeros(3, 4, 2, 8)
    key, value = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    cpu.reshape_and_cache(key, value, k_cache, v_cache, torch.tensor([9, 0, 5]))
    assert torch.equal(k_cache[2, 1], key[0]) and torch.equal(k_cache[0, 0], key[1])
    assert torch.equal(v_cache[1, 1], value[2])
    assert k_cache.abs().sum() == key.abs().sum()


@pytest.mark.parametrize("rows", [5, 300])          # the fused kernel, and the prefill path
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_rms_norm_and_add_rms_norm(dtype, atol, rows):
    x = torch.randn(rows, 33).to(dtype)
    residual = torch.randn(rows, 33).to(dtype)
    weight = (torch.rand(33) + 0.5).to(dtype)
    def ref(t):
        t32 = t.float()
        return (t32 / torch.sqrt(t32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype) * weight
    assert torch.allclose(cpu.rms_norm(x, weight, 1e-6).float(), ref(x).float(), atol=atol)
    normed, new_res = cpu.add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(new_res, x + residual)
    assert torch.allclose(normed.float(), ref(x + residual).float(), atol=atol)


def test_rope_matches_transformers_rotate_half():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    head_dim, positions = 32, torch.tensor([0, 3, 17, 100])
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(128).float(), inv_freq)
    cache = torch.cat((freqs.cos(), freqs.sin()), -1)
    q, k = torch.randn(4, 6, head_dim), torch.randn(4, 2, head_dim)
    cos, sin = cache[positions].unsqueeze(1).chunk(2, dim=-1)
    got_q, got_k = cpu.rope(q, k, torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1))
    emb = torch.cat((freqs[positions], freqs[positions]), -1)
    want_q, want_k = apply_rotary_pos_emb(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                                          emb.cos().unsqueeze(0), emb.sin().unsqueeze(0))
    assert torch.allclose(got_q, want_q[0].transpose(0, 1), atol=1e-5)
    assert torch.allclose(got_k, want_k[0].transpose(0, 1), atol=1e-5)


def test_silu_and_mul():
    x = torch.randn(7, 10)
    assert torch.allclose(cpu.silu_and_mul(x), torch.nn.functional.silu(x[:, :5]) * x[:, 5:])


def test_registry_has_cpu_reference_for_every_op():
    registry = build_registry(("cpu",))
    assert set(registry.ops("cpu")) >= {"rms_norm", "add_rms_norm", "rope", "silu_and_mul",
                                        "reshape_and_cache", "paged_attention", "linear", "quantize_per_tensor",
                                        "dynamic_quant_per_token", "quant_matmul", "weight_only_matmul",
                                        "fp8_matmul"}


def test_registry_selects_by_priority_and_explains_rejections(monkeypatch):
    registry = OpRegistry()
    registry.register(Kernel("mm", "cpu", "slow", lambda: "slow", priority=0))
    registry.register(Kernel("mm", "cpu", "fast", lambda: "fast",
                             supports=lambda **t: None if t.get("bits") == 8 else "needs 8-bit", priority=10))
    assert registry.select("mm", "cpu", bits=8).name == "fast"
    assert registry.select("mm", "cpu", bits=4).name == "slow"
    monkeypatch.setenv("ASCEND_LLM_DISABLE_KERNELS", "slow")
    with pytest.raises(ValueError, match="needs 8-bit.*disabled"):
        registry.select("mm", "cpu", bits=4)
    with pytest.raises(ValueError, match="no kernel registered"):
        registry.select("mm", "npu")
