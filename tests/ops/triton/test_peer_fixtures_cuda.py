"""Every peer-written golden checkpoint (tests/quant/peer_fixtures.py: msModelSlim 26.1.0 and
llm-compressor 0.14) loaded on the cuda op set (the Triton kernels; the interpreter on CPU tensors
in CI) against the same model on the CPU backend, fp32, one prefill of the fixture's first row.

What each scheme runs (asserted by kernel name):
- W8A8 static / dynamic (msModelSlim, compressed-tensors int8): the Triton activation quantization
  and int8 GEMM (`quant_matmul`, `quantize_per_tensor`, `dynamic_quant_per_token`);
- W8A16 (msModelSlim, per channel): W8A8's per-op path with float activations (the dequantized
  int8 weight through `linear`);
- W4A16 / W8A16 group 32 (compressed-tensors pack-quantized; msModelSlim W4A16 per-group and
  per-channel, W8A16 per-group): the Triton group-wise kernel;
- FP8 per-tensor (compressed-tensors FP8): the Triton per-tensor `fp8_matmul`;
- FP8 per-channel dynamic (FP8_DYNAMIC, also with the fp8 KV scheme): the Triton row-wise
  `fp8_matmul` (scheme "per_token").

Tolerance: fp32 on both sides with the same integer codes and scales, so only summation order
differs, except where an int8 activation sits within fp32 rounding of a quantization boundary
(none measured): logits within 1e-4 (measured max 1.1e-6, 2026-12-07; 0 to 1.1e-6 per fixture).
The two fixtures with KV-cache scales (msModelSlim C8, the llm-compressor fp8 KV scheme) also run
with their int8 / fp8 cache on the Triton cache write and paged attention.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
from tests.ops.triton.op_sets import op_set  # noqa: E402
from tests.quant.peer_fixtures import CASES, build, input_ids, prefill_logits  # noqa: E402

ATOL = 1e-4




def _kernel_names(model: torch.nn.Module) -> set[str]:
    """Names of the registry kernels bound to the model's linear layers."""
    names = set()
    for module in model.modules():
        for attr in ("weight_only_group_kernel", "weight_only_kernel", "fp8_kernel", "w8a8_layer_kernel"):
            kernel = getattr(module, attr, None)
            if kernel is not None:
                names.add(kernel.name)
    return names


@pytest.mark.parametrize("case", CASES)
def test_fixture_on_triton_matches_cpu(case, device):
    dtype = torch.float32
    config, cpu_model = build(case, op_set("cpu"), dtype)
    _, cuda_model = build(case, op_set("cuda"), dtype, device)
    row = input_ids(case)[0].tolist()
    want = prefill_logits(cpu_model, config, row, dtype)
    got = prefill_logits(cuda_model, config, row, dtype, device)
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    assert want.std() > 0.1
    method = type(cuda_model.model.layers[0].self_attn.qkv_proj.quant_method).__name__
    qkv = cuda_model.model.layers[0].self_attn.qkv_proj
    if method in ("GroupWeightOnlyLinearMethod", "ModelSlimWeightOnlyMethod"):
        assert _kernel_names(cuda_model) == {"cuda.triton.weight_only_group_matmul"}
    if method == "Fp8CheckpointLinearMethod":
        assert _kernel_names(cuda_model) <= {"cuda.triton.fp8_matmul_per_tensor",
                                             "cuda.triton.fp8_matmul_per_tensor_static"}
    if method == "CtFp8ChannelDynamicMethod":
        assert _kernel_names(cuda_model) == {"cuda.triton.fp8_matmul_per_token"}
    if method in ("W8A8StaticLinearMethod", "CtW8A8StaticMethod", "W8A8DynamicLinearMethod", "CtW8A8DynamicMethod"):
        assert qkv.w8a8_matmul.__module__ == "ascend_llm.ops.triton.int8_gemm"
        assert qkv.w8a8_quantize.__module__ == "ascend_llm.ops.triton.int8_gemm"


@pytest.mark.parametrize("case, kv_cache_dtype", [
    ("msmodelslim/llama_w8a8_c8", "int8"),                   # msModelSlim C8 kv_cache_scale / offset
    ("llmcompressor/llama_fp8_dynamic_kv_fp8", "fp8"),      # compressed-tensors k_scale / v_scale
])
def test_kv_cache_scales_fixture_on_triton_matches_cpu(case, kv_cache_dtype, device):
    """The checkpoint's KV scales in a quantized cache: the Triton cache write and paged attention
    against the CPU's, the same rounding of K / V on both sides (measured max 0 / 7e-7, bound 1e-4)."""
    dtype = torch.float32
    config, cpu_model = build(case, op_set("cpu"), dtype, kv_cache_dtype=kv_cache_dtype)
    _, cuda_model = build(case, op_set("cuda"), dtype, device, kv_cache_dtype=kv_cache_dtype)
    attn = cuda_model.model.layers[0].self_attn.attn
    assert attn.kv_cache_dtype == kv_cache_dtype and attn.kv_scales is not None
    assert attn._paged_attention.__module__ == "ascend_llm.ops.triton.paged_attention"
    row = input_ids(case)[0].tolist()
    want = prefill_logits(cpu_model, config, row, dtype, kv_cache_dtype=kv_cache_dtype)
    got = prefill_logits(cuda_model, config, row, dtype, device, kv_cache_dtype=kv_cache_dtype)
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    _, float_cache_model = build(case, op_set("cpu"), dtype)
    float_cache = prefill_logits(float_cache_model, config, row, dtype)
    assert float((want - float_cache).abs().max()) > 1e-4          # the cache really is quantized
