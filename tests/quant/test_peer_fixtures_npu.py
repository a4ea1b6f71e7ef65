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
- W4A16 / W8A16 group 32, symmetric or with zero points (compressed-tensors pack-quantized):
  npu_weight_quant_batchmatmul with antiquant_group_size 32 (scale / offset [k / 32, n]);
- FP8 per-tensor (compressed-tensors FP8) and per-channel dynamic (FP8_DYNAMIC, also with the fp8
  KV scheme): the NPU backend has no `fp8_matmul` kernel (Atlas A2 / A3 have no fp8 matmul), so the
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
"""
from __future__ import annotations

import logging

import pytest
import torch

from ascend_llm.ops import build_op_set
from tests.ops.npu_emulation import npu_emulation  # noqa: F401  (fixture)
from tests.quant.peer_fixtures import CASES, build, input_ids, prefill_logits

FLOAT_ACT_BOUND, INT8_ACT_BOUND, FP8_ACT_BOUND = (0.02, 0.004), (0.15, 0.03), (0.3, 0.05)
# quant method of the attention qkv_proj -> (torch_npu op it must call, (max, mean) bound)
EXPECTED = {
    "W8A8StaticLinearMethod": ("npu_quant_matmul", INT8_ACT_BOUND),
    "CtW8A8StaticMethod": ("npu_quant_matmul", INT8_ACT_BOUND),
    "W8A8DynamicLinearMethod": ("npu_dynamic_quant", INT8_ACT_BOUND),
    "CtW8A8DynamicMethod": ("npu_dynamic_quant", INT8_ACT_BOUND),
    "W8A16LinearMethod": ("npu_weight_quant_batchmatmul", FLOAT_ACT_BOUND),
    "GroupWeightOnlyLinearMethod": ("npu_weight_quant_batchmatmul", FLOAT_ACT_BOUND),
    "Fp8CheckpointLinearMethod": (None, FP8_ACT_BOUND),
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
    if method == "GroupWeightOnlyLinearMethod":
        layer = npu_model.model.layers[0].mlp.down_proj                  # k = 96: three groups of 32
        assert layer.weight_only_group_kernel.name == "npu.weight_quant_batchmatmul_group"
        assert layer.npu_antiquant_group_size == 32 and tuple(layer.npu_antiquant_scale.shape) == (3, 64)
    assert not any("weight_only_group_matmul" in line for line in steps_aside), steps_aside
