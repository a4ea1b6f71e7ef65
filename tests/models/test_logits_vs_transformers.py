"""Our Llama / Qwen2 implementations against transformers' own modeling code (fp32)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from ascend_llm.engine.kv_cache import KVCacheSpec, allocate_kv_caches
from ascend_llm.loader import iter_safetensors_weights, load_hf_config
from ascend_llm.models.forward_batch import ForwardBatch
from ascend_llm.models.registry import get_model_class
from ascend_llm.models.weight_utils import process_weights_after_loading
from ascend_llm.ops import AttentionMetadata, build_op_set

BLOCK_SIZE = 4   # small blocks so sequences span several of them


def build_ours(model_dir):
    """Load as the engine does: weights, then per-layer kernel selection and re-layout."""
    config = load_hf_config(model_dir)
    model = get_model_class(config)(config, build_op_set("cpu"), None, torch.float32)
    model.load_weights(iter_safetensors_weights(model_dir))
    process_weights_after_loading(model)
    return config, model.eval()


@torch.inference_mode()
def run_chunks(model, config, token_ids: list[int], chunks: list[int], num_blocks: int = 64) -> torch.Tensor:
    """Feed token_ids in chunks of the given sizes; returns logits of every position [T, vocab]."""
    spec = KVCacheSpec.from_hf_config(config, BLOCK_SIZE, torch.float32)
    kv = allocate_kv_caches(spec, num_blocks, torch.device("cpu"))
    # a deliberately scrambled block table: blocks need not be contiguous
    table = list(reversed(range(0, num_blocks, 2)))[: -(-len(token_ids) // BLOCK_SIZE)]
    logits, start = [], 0
    for n in chunks:
        end = start + n
        slots = [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(start, end)]
        meta = AttentionMetadata.build([n], [end], [table], slots, BLOCK_SIZE, num_blocks,
                                       torch.device("cpu"))
        batch = ForwardBatch(torch.tensor(token_ids[start:end]), torch.arange(start, end), meta, kv,
                             torch.arange(n))
        logits.append(model.compute_logits(model(batch)))
        start = end
    return torch.cat(logits)


def reference_logits(model_dir, token_ids: list[int]) -> torch.Tensor:
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        return hf(torch.tensor([token_ids])).logits[0].float()


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir", "tiny_qwen2_tied_dir"])
@pytest.mark.parametrize("chunks", [[23], [7, 9, 1, 1, 5], [1] * 23])
def test_tiny_models_match_transformers(fixture, chunks, request):
    model_dir = request.getfixturevalue(fixture)
    token_ids = torch.randint(3, 300, (23,), generator=torch.Generator().manual_seed(1)).tolist()
    config, ours = build_ours(model_dir)
    got = run_chunks(ours, config, token_ids, chunks)
    want = reference_logits(model_dir, token_ids)
    # fp32 on both sides; only summation order differs
    assert torch.allclose(got, want, atol=2e-4, rtol=0), (got - want).abs().max()
    assert want.std() > 0.1   # the comparison is not between near-constant logits


def test_qwen2_has_qkv_bias_and_no_o_bias(tiny_qwen2_dir):
    _, ours = build_ours(tiny_qwen2_dir)
    attn = ours.model.layers[0].self_attn
    assert attn.qkv_proj.bias is not None and attn.o_proj.bias is None
    assert attn.qkv_proj.bias.abs().sum() > 0   # loaded, not left at init


@pytest.mark.parametrize("disabled", ["", "cpu.onednn_linear,cpu.onednn_dense_linear"])
def test_tied_embeddings_share_storage(tiny_qwen2_tied_dir, tiny_qwen2_dir, monkeypatch, disabled):
    # the tied head keeps the embedding's storage whichever kernel runs it
    monkeypatch.setenv("ASCEND_LLM_CPU_LINEAR", "onednn")   # whatever this machine's CPU is
    monkeypatch.setenv("ASCEND_LLM_DISABLE_KERNELS", disabled)
    _, tied = build_ours(tiny_qwen2_tied_dir)
    _, untied = build_ours(tiny_qwen2_dir)
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


_REFERENCE_SMALL_OPS = ",".join(f"cpu.fused_{op}" for op in (
    "rms_norm", "add_rms_norm", "rope", "silu_and_mul", "reshape_and_cache", "paged_attention"))


@pytest.mark.parametrize("choice, disabled", [("gemv", ""), ("onednn", ""), ("onednn", "cpu.onednn_linear"),
                                              ("onednn", "cpu.onednn_linear,cpu.onednn_dense_linear"),
                                              ("gemv", _REFERENCE_SMALL_OPS)])
def test_every_cpu_linear_kernel_match_transformers(tiny_qwen2_tied_dir, choice, disabled, monkeypatch):
    monkeypatch.setenv("ASCEND_LLM_CPU_LINEAR", choice)     # whatever this machine's CPU is
    monkeypatch.setenv("ASCEND_LLM_DISABLE_KERNELS", disabled)
    token_ids = list(range(5, 30))
    config, ours = build_ours(tiny_qwen2_tied_dir)
    got = run_chunks(ours, config, token_ids, [10, 1, 14])
    assert torch.allclose(got, reference_logits(tiny_qwen2_tied_dir, token_ids), atol=2e-4, rtol=0)
