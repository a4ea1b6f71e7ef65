"""A tiny Llama built with the cuda op set (every Triton kernel the model uses) against the same
model on the CPU backend: prefill, chunked prefill and decode steps over a scrambled block
table, float and wint8 / wint4 linears. fp32; logits within 1e-4 (summation order only)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
from ascend_llm.engine.kv_cache import KVCacheSpec, allocate_kv_caches  # noqa: E402
from ascend_llm.loader import iter_safetensors_weights, load_hf_config  # noqa: E402
from ascend_llm.models.forward_batch import ForwardBatch  # noqa: E402
from ascend_llm.models.registry import get_model_class  # noqa: E402
from ascend_llm.models.weight_utils import process_weights_after_loading  # noqa: E402
from ascend_llm.ops import AttentionMetadata  # noqa: E402
from ascend_llm.quant.weight_only import WInt4Config, WInt8Config  # noqa: E402
from tests.ops.triton.op_sets import op_set  # noqa: E402

BLOCK_SIZE = 4
CHUNKS = [7, 9, 1, 1, 5]                          # prefill, chunked prefill, three decode steps




def _build(model_dir, backend: str, quant_config, device: torch.device):
    config = load_hf_config(model_dir)
    model = get_model_class(config)(config, op_set(backend), quant_config, torch.float32)
    model.load_weights(iter_safetensors_weights(model_dir))
    model.to(device)
    process_weights_after_loading(model)
    return config, model.eval()


@torch.inference_mode()
def _logits(model, config, token_ids: list[int], device: torch.device, num_blocks: int = 16) -> torch.Tensor:
    spec = KVCacheSpec.from_hf_config(config, BLOCK_SIZE, torch.float32)
    kv = allocate_kv_caches(spec, num_blocks, device)
    table = list(reversed(range(0, num_blocks, 2)))[: -(-len(token_ids) // BLOCK_SIZE)]
    logits, start = [], 0
    for n in CHUNKS:
        end = start + n
        slots = [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(start, end)]
        meta = AttentionMetadata.build([n], [end], [table], slots, BLOCK_SIZE, num_blocks, device)
        batch = ForwardBatch(torch.tensor(token_ids[start:end], device=device),
                             torch.arange(start, end, device=device), meta, kv,
                             torch.arange(n, device=device))
        logits.append(model.compute_logits(model(batch)).cpu())
        start = end
    return torch.cat(logits)


@pytest.mark.slow
@pytest.mark.parametrize("quant_config", [None, WInt8Config(), WInt4Config()], ids=["float", "wint8", "wint4"])
def test_tiny_llama_cuda_backend_matches_cpu_backend(tiny_llama_dir, device: torch.device, quant_config) -> None:
    token_ids = torch.randint(3, 300, (sum(CHUNKS),)).tolist()
    config, cpu_model = _build(tiny_llama_dir, "cpu", quant_config, torch.device("cpu"))
    _, cuda_model = _build(tiny_llama_dir, "cuda", quant_config, device)
    layer = cuda_model.model.layers[0]
    triton_fns = (layer.input_layernorm._rms_norm, layer.input_layernorm._add_rms_norm,
                  layer.self_attn._rope, layer.self_attn.attn._paged_attention,
                  layer.self_attn.attn._reshape_and_cache, layer.mlp.act_fn._silu_and_mul)
    assert all(fn.__module__.startswith("ascend_llm.ops.triton.") for fn in triton_fns)
    if quant_config is not None:
        assert layer.mlp.down_proj.weight_only_kernel.name == "cuda.triton.weight_only_matmul"
    want = _logits(cpu_model, config, token_ids, torch.device("cpu"))
    got = _logits(cuda_model, config, token_ids, device)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert want.std() > 0.1                       # not a comparison of near-constant logits
