"""Every peer-written golden checkpoint (tests/quant/peer_fixtures.py: msModelSlim 26.1.0 and
llm-compressor 0.14) loaded on the emulated NPU (tests/ops/npu_emulation.py) against the same
model on the CPU backend, both in float16 (the NPU's quant matmuls take float16 / bfloat16
activations); the per-tool tests compare the CPU backend with the tools' own logits.

What each scheme runs on the NPU, asserted through the recorded torch_npu calls and kernel names:
- W8A8 static (msModelSlim classic and m2, compressed-tensors int8 static, also asymmetric):
  npu_quantize + npu_quant_matmul;
- W8A8_DYNAMIC (msModelSlim classic and v1, compressed-tensors int8 dynamic): npu_dynamic_quant +
  npu_quant_matmul;
- W8A16 (msModelSlim, per channel): npu_weight_quant_batchmatmul;
- W4A16 / W8A16 group 32, symmetric or with zero points (compressed-tensors pack-quantized;
  msModelSlim W4A16 / W8A16 per-group): npu_weight_quant_batchmatmul with antiquant_group_size 32
  (scale / offset [k / 32, n]); msModelSlim W4A16 per-channel: the same op per channel;
- FastDeploy wint8 / wint4 (`quant_weight` in Paddle's CUTLASS layout, read back to row-major at
  load): npu_weight_quant_batchmatmul (wint4 re-packed by npu_convert_weight_to_int4pack);
- FP8 per-tensor (compressed-tensors FP8), per-channel dynamic (FP8_DYNAMIC, also with the fp8
  KV scheme), FastDeploy block_wise_fp8 and compressed-tensors FP8_BLOCK (128 x 128 blocks): the NPU backend has no `fp8_matmul` kernel (Atlas A2 / A3 have no fp8 matmul), so the
  registry steps aside to the plain-torch reference on the NPU device and logs why (asserted, and
  that no torch_npu matmul ran for them).

Tolerances, max / mean |logit_npu - logit_cpu| over the [2, 8, 128] logits (float16, logit std
~0.63). The NPU's fused norm / rotary / SwiGLU / attention round once where the CPU kernels round
between steps, and its antiquant scales are float16. Measured on 2026-12-07, bounds ~3-5x:
- float activations into the linears (W8A16, group weight-only): max 0.0037, mean 0.0007;
  bound 0.02 / 0.004;
- int8 activations (W8A8 static / dynamic): a one-ulp difference upstream flips an int8 activation
  by one step, moving a logit by ~1e-2 (as in tests/e2e/test_npu_backend.py): max 0.057, mean
  0.010; bound 0.15 / 0.03;
- fp8 activations (both fp8 schemes, the same reference kernel on both backends): an e4m3 step is
  1/16 - 1/8 of the value, so the same upstream ulps flip much coarser steps: max 0.133, mean
  0.021 (the fp8 checkpoints' own gap to transformers is 0.14 / 0.027,
  test_peer_compressed_tensors.py); bound 0.3 / 0.05.
The two fixtures with KV-cache scales (msModelSlim C8, the llm-compressor fp8 KV scheme) also run
through the engine, which applies them (int8 / fp8 cache), NPU vs CPU.
"""
from __future__ import annotations

import logging

import pytest
import torch

from ascend_llm.ops import build_op_set
from tests.ops.npu_emulation import npu_emulation  # noqa: F401  (fixture)
from tests.quant.peer_fixtures import CASES, ROOT, build, input_ids, prefill_logits

FLOAT_ACT_BOUND, INT8_ACT_BOUND, FP8_ACT_BOUND = (0.02, 0.004), (0.15, 0.03), (0.3, 0.05)
# quant method of the attention qkv_proj -> (torch_npu op it must call, (max, mean) bound)
EXPECTED = {
    "W8A8StaticLinearMethod": ("npu_quant_matmul", INT8_ACT_BOUND),
    "CtW8A8StaticMethod": ("npu_quant_matmul", INT8_ACT_BOUND),
    "W8A8DynamicLinearMethod": ("npu_dynamic_quant", INT8_ACT_BOUND),
    "CtW8A8DynamicMethod": ("npu_dynamic_quant", INT8_ACT_BOUND),
    "W8A16LinearMethod": ("npu_weight_quant_batchmatmul", FLOAT_ACT_BOUND),
    "GroupWeightOnlyLinearMethod": ("npu_weight_quant_batchmatmul", FLOAT_ACT_BOUND),
    "ModelSlimWeightOnlyMethod": ("npu_weight_quant_batchmatmul", FLOAT_ACT_BOUND),
    "Fp8CheckpointLinearMethod": (None, FP8_ACT_BOUND),
    "BlockFp8CheckpointLinearMethod": (None, FP8_ACT_BOUND),
    "CtFp8BlockMethod": (None, FP8_ACT_BOUND),
    "PrequantWeightOnlyLinearMethod": ("npu_weight_quant_batchmatmul", FLOAT_ACT_BOUND),
    "CtFp8ChannelDynamicMethod": (None, FP8_ACT_BOUND),
}
QUANT_MATMULS = ("npu_quant_matmul", "npu_weight_quant_batchmatmul", "npu_grouped_matmul")


@pytest.mark.parametrize("case", CASES)
def test_fixture_on_the_emulated_npu_matches_cpu(case, npu_emulation, caplog):
    dtype = torch.float16
    config, cpu_model = build(case, build_op_set("cpu"), dtype)
    with caplog.at_level(logging.INFO, logger="ascend_llm.ops.registry"):
        _, npu_model = build(case, build_op_set("npu"), dtype)
    method = type(npu_model.model.layers[0].self_attn.qkv_proj.quant_method).__name__
    op, (max_bound, mean_bound) = EXPECTED[method]
    rows = input_ids(case).tolist()
    want = torch.stack([prefill_logits(cpu_model, config, row, dtype) for row in rows])
    got = torch.stack([prefill_logits(npu_model, config, row, dtype) for row in rows])
    err = (got - want).abs()
    assert float(err.max()) < max_bound and float(err.mean()) < mean_bound, (method, err.max(), err.mean())
    assert want.std() > 0.1
    called = {c.name for c in npu_emulation.calls}
    assert {"npu_fused_infer_attention_score", "npu_rotary_mul", "npu_swiglu"} <= called
    if op is not None:
        assert op in called, (method, sorted(called))
    else:
        assert not called & set(QUANT_MATMULS), (method, sorted(called))
    steps_aside = [r.getMessage() for r in caplog.records if "steps aside" in r.getMessage()]
    if op is None:                                                       # the fp8 schemes
        assert any("'fp8_matmul' on backend 'npu'" in line for line in steps_aside), steps_aside
        assert npu_model.model.layers[0].self_attn.qkv_proj.fp8_kernel.name == "npu.torch_reference.fp8_matmul"
    layer = npu_model.model.layers[0].mlp.down_proj                      # k = 96: three groups of 32
    if method in ("GroupWeightOnlyLinearMethod", "ModelSlimWeightOnlyMethod"):
        assert layer.weight_only_group_kernel.name == "npu.weight_quant_batchmatmul_group"
    if method in ("GroupWeightOnlyLinearMethod", "ModelSlimWeightOnlyMethod") and layer.group_size == 32:
        assert layer.npu_antiquant_group_size == 32 and tuple(layer.npu_antiquant_scale.shape) == (3, 64)
    assert not any("weight_only_group_matmul" in line for line in steps_aside), steps_aside


def _engine_prompt_logprobs(case: str, device: str, tokenizer: str, kv_cache_dtype: str):
    """(LLM, prompt log-probs of the fixture's reference rows) through the engine in float16."""
    from ascend_llm import LLM, SamplingParams
    rows = input_ids(case).tolist()
    llm = LLM(str(ROOT / case), tokenizer=tokenizer, device=device, dtype="float16",
              kv_cache_dtype=kv_cache_dtype, max_model_len=32, enforce_eager=True)
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, ignore_eos=True)
    outs = llm.generate(prompt_token_ids=rows, sampling_params=params, use_tqdm=False)
    return llm, torch.tensor([entry[t].logprob for row, out in zip(rows, outs)
                              for t, entry in zip(row[1:], out.prompt_logprobs[1:])])


@pytest.mark.parametrize("case, kv_cache_dtype, cache, bound", [
    # C8: auto -> int8 with the checkpoint's kv_cache_scale / offset; the NPU writes the int8 cache
    # and attends with FIA antiquant scales. Measured max / mean |d logprob| 0.026 / 0.011
    ("msmodelslim/llama_w8a8_c8", "auto", "int8", (0.08, 0.03)),
    # the fp8 KV scheme's k_scale / v_scale: the NPU has no fp8-cache kernels, so reshape_and_cache
    # and paged_attention step aside to the torch reference (logged); fp8 activations and cache
    # on both sides, measured 0.062 / 0.025
    ("llmcompressor/llama_fp8_dynamic_kv_fp8", "fp8", "fp8", (0.2, 0.06)),
])
def test_quantized_kv_cache_fixture_on_the_emulated_npu_engine(case, kv_cache_dtype, cache, bound, tiny_llama_dir,
                                                               npu_emulation, caplog):
    """The fixtures that carry KV-cache scales, through the engine (which applies them) on the NPU
    vs the CPU; the tool saves no tokenizer, any one decodes ids < 128."""
    _, want = _engine_prompt_logprobs(case, "cpu", str(tiny_llama_dir), kv_cache_dtype)
    with caplog.at_level(logging.INFO, logger="ascend_llm.ops.registry"):
        llm, got = _engine_prompt_logprobs(case, "npu", str(tiny_llama_dir), kv_cache_dtype)
    assert llm.llm_engine.model_runner.kv_cache_dtype == cache
    err = (got - want).abs()
    assert float(err.max()) < bound[0] and float(err.mean()) < bound[1], (err.max(), err.mean())
    steps_aside = " ".join(r.getMessage() for r in caplog.records if "steps aside" in r.getMessage())
    if cache == "int8":
        assert npu_emulation.called("npu_fused_infer_attention_score")[-1].args["key"].startswith("int8")
        assert "'paged_attention' on backend 'npu'" not in steps_aside
    else:
        assert not npu_emulation.called("npu_fused_infer_attention_score")
        assert "'reshape_and_cache' on backend 'npu'" in steps_aside and "NPU quantized KV: int8 only" in steps_aside
        assert "'paged_attention' on backend 'npu'" in steps_aside
