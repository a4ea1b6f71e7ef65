"""Quantized MoE experts on the NPU backend (npu_grouped_matmul through the emulated torch_npu)
vs the CPU reference methods, on fresh random experts and tokens.

One FusedMoE layer per format is built twice from the same checkpoint tensors, on CPU ops and on
NPU ops, in the same activation dtype; outputs are compared relative to the CPU output's range
(max |cpu|). Tolerances (measured 2026-11-23 on 13 tokens, 8 experts, H=64, I=32):
- W8A8_DYNAMIC: both sides quantize activations identically (per token, rowmax/127); SwiGLU is
  npu_swiglu (fp32, one rounding) vs the CPU's silu_and_mul, so an int8 activation of down may
  flip by one step: measured 0.24 % (float16) / 0.9 % (bfloat16): bound 1 % / 3 %;
- wint8 / wint4: antiquant_scale is rounded to the activation dtype (2^-11 / 2^-8 relative) and
  the hidden state is rounded once more: measured <= 0.11 % / 0.86 %: bound 1 % / 3 %.
"""
from __future__ import annotations

import logging

import pytest
import torch

from ascend_llm.layers.moe import FusedMoE
from ascend_llm.layers.moe_routing import RoutingConfig
from ascend_llm.ops import build_op_set
from ascend_llm.ops import npu_moe
from ascend_llm.ops.npu_runtime import ACL_FORMAT_FRACTAL_NZ
from tests.ops.npu_emulation import NPUArgumentError, install_fake_torch_npu, npu_emulation  # noqa: F401
from tests.quant.moe_layer_fixtures import Experts, checkpoint_tensors, quant_config

NUM_EXPERTS, HIDDEN, INTER = 8, 64, 32
PREFIX = "model.layers.8.mlp.experts"           # layer 8: the WINT2 range of the w4w2 config
RTOL_OF_RANGE = {torch.float16: 0.01, torch.bfloat16: 0.03}
KERNEL = {"w8a8_dynamic": "npu.grouped_matmul_w8a8_dynamic", "wint8": "npu.grouped_matmul_weight_only",
          "wint4": "npu.grouped_matmul_weight_only", "prequant_wint8": "npu.grouped_matmul_weight_only",
          "prequant_wint4": "npu.grouped_matmul_weight_only"}


def build(fmt: str, backend: str, dtype: torch.dtype, experts: Experts) -> FusedMoE:
    num_experts, inter, hidden = experts.gate.shape
    layer = FusedMoE(num_experts, hidden, inter, RoutingConfig(2, renormalize=True), dtype,
                     quant_config(fmt, PREFIX, num_experts), PREFIX, build_op_set(backend))
    for name, tensor in checkpoint_tensors(fmt, experts, PREFIX).items():
        layer.load_checkpoint_tensor(name, tensor)
    layer.quant_method.process_weights_after_loading(layer)
    return layer


def tokens(num_tokens: int, dtype: torch.dtype, seed: int, hidden: int = HIDDEN) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen).to(dtype)                  # [T, H]
    logits = torch.randn(num_tokens, NUM_EXPERTS, generator=gen)                   # [T, E]
    return x, logits


def relative_to_range(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


@pytest.mark.parametrize("fmt", list(KERNEL))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 13])
def test_quantized_experts_match_cpu_reference(npu_emulation, fmt, dtype, num_tokens):
    experts = Experts.random(NUM_EXPERTS, HIDDEN, INTER, seed=num_tokens + 3)
    x, logits = tokens(num_tokens, dtype, seed=num_tokens)
    cpu, npu = build(fmt, "cpu", dtype, experts), build(fmt, "npu", dtype, experts)
    assert cpu.fused_experts is None and npu.fused_experts is not None
    assert npu.ops.select("fused_experts", scheme="w8a8_dynamic" if fmt == "w8a8_dynamic" else "weight_only",
                          bits=4 if fmt.endswith("4") else 8, dtype=dtype).name == KERNEL[fmt]
    with torch.inference_mode():
        want, got = cpu(x, logits), npu(x, logits)
    assert got.dtype == dtype and got.shape == want.shape
    assert float(want.float().abs().max()) > 0.1
    assert relative_to_range(got, want) < RTOL_OF_RANGE[dtype]
    calls = npu_emulation.called("npu_grouped_matmul")
    assert len(calls) == 2                                       # gate_up and down
    if fmt == "w8a8_dynamic":
        assert len(npu_emulation.called("npu_dynamic_quant")) == 2
        scale_dtype = "bfloat16" if dtype == torch.bfloat16 else "float32"
        assert all(c.args["x"].startswith("int8") and c.args["weight"].endswith(":NZ") for c in calls)
        assert all(c.args["scale"].startswith(scale_dtype) for c in calls)
        assert calls[0].args["per_token_scale"] == f"float32[{num_tokens * 2}]:ND"
    else:
        weight_dtype = "int32" if fmt.endswith("4") else "int8"
        assert all(c.args["weight"].startswith(weight_dtype) for c in calls)
        assert all(c.args["antiquant_scale"].startswith(str(dtype).removeprefix("torch.")) for c in calls)


def test_quantized_experts_with_idle_experts_match_reference(npu_emulation):
    """Routing every token to experts 2 and 5 leaves six experts with empty groups."""
    experts = Experts.random(NUM_EXPERTS, HIDDEN, INTER, seed=11)
    x, logits = tokens(9, torch.float16, seed=12)
    logits[:, [2, 5]] += 20.0
    for fmt in ("w8a8_dynamic", "wint4"):
        cpu, npu = build(fmt, "cpu", torch.float16, experts), build(fmt, "npu", torch.float16, experts)
        with torch.inference_mode():
            assert relative_to_range(npu(x, logits), cpu(x, logits)) < RTOL_OF_RANGE[torch.float16]
    assert npu_emulation.called("npu_grouped_matmul")[-1].args["group_list"] == "int64[8]:ND"


def test_prepare_relayouts_expert_weights(npu_emulation):
    experts = Experts.random(NUM_EXPERTS, HIDDEN, INTER, seed=5)
    w8a8 = build("w8a8_dynamic", "npu", torch.bfloat16, experts)
    assert w8a8.w13_weight.shape == (NUM_EXPERTS, HIDDEN, 2 * INTER) and w8a8.w13_weight.dtype == torch.int8
    assert npu_emulation.get_npu_format(w8a8.w2_weight) == ACL_FORMAT_FRACTAL_NZ
    assert w8a8.w2_weight.shape == (NUM_EXPERTS, INTER, HIDDEN)
    assert w8a8.npu_w13_scale.shape == (NUM_EXPERTS, 2 * INTER) and w8a8.npu_w13_scale.dtype == torch.bfloat16
    assert build("w8a8_dynamic", "npu", torch.float16, experts).npu_w2_scale.dtype == torch.float32
    wint4 = build("prequant_wint4", "npu", torch.float16, experts)
    assert wint4.w13_weight.dtype == torch.int32 and wint4.w13_weight.shape == (NUM_EXPERTS, HIDDEN, 2 * INTER // 8)
    assert wint4.w2_weight.shape == (NUM_EXPERTS, INTER, HIDDEN // 8)
    assert wint4.npu_w2_antiquant_scale.shape == (NUM_EXPERTS, HIDDEN)
    wint8 = build("wint8", "npu", torch.float16, experts)
    assert wint8.w13_weight.dtype == torch.int8 and wint8.w13_weight.shape == (NUM_EXPERTS, HIDDEN, 2 * INTER)


# ---------------------------------------------------------------------- fallbacks, with reasons

def _fallback(fmt: str, dtype: torch.dtype, experts: Experts, caplog: pytest.LogCaptureFixture,
              reason: str) -> None:
    with caplog.at_level(logging.INFO, logger="ascend_llm.quant.moe_base"):
        npu = build(fmt, "npu", dtype, experts)
    assert npu.fused_experts is None
    assert any(reason in r.getMessage() and PREFIX in r.getMessage() for r in caplog.records), caplog.text
    cpu = build(fmt, "cpu", dtype, experts)
    x, logits = tokens(5, dtype, seed=7, hidden=experts.gate.shape[2])
    with torch.inference_mode():
        assert relative_to_range(npu(x, logits), cpu(x, logits)) < 0.03


def test_wint2_experts_fall_back_with_the_reason(npu_emulation, caplog):
    _fallback("wint2", torch.float16, Experts.random(NUM_EXPERTS, HIDDEN, INTER, seed=1), caplog, "bits=2")
    assert not npu_emulation.called("npu_grouped_matmul")


@pytest.mark.parametrize("fmt", ["w8a8_dynamic", "wint8"])
def test_310p_falls_back_with_the_reason(monkeypatch, caplog, fmt):
    fake = install_fake_torch_npu(monkeypatch, soc="Ascend310P3")
    _fallback(fmt, torch.float16, Experts.random(NUM_EXPERTS, HIDDEN, INTER, seed=2), caplog, "310P")
    assert not fake.called("npu_grouped_matmul") and not fake.called("npu_dynamic_quant")


def test_float32_activations_fall_back_with_the_reason(npu_emulation, caplog):
    _fallback("w8a8_dynamic", torch.float32, Experts.random(NUM_EXPERTS, HIDDEN, INTER, seed=3), caplog,
              "dtype=torch.float32")


def test_int4_with_output_size_not_a_multiple_of_8_falls_back(npu_emulation, caplog):
    _fallback("wint4", torch.float16, Experts.random(NUM_EXPERTS, 60, INTER, seed=4), caplog, "hidden_size=60")


# ------------------------------------------------------------ the emulation rejects what the op does

def _int8_call(fake, scale_dtype: torch.dtype, output_dtype: torch.dtype, pts_rows: int = 6):
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-127, 128, (6, 32), generator=gen, dtype=torch.int8)
    w = torch.randint(-127, 128, (2, 32, 16), generator=gen, dtype=torch.int8)
    scale = (torch.rand(2, 16, generator=gen) * 0.01).to(scale_dtype)
    pts = torch.rand(pts_rows, generator=gen) * 0.01
    return fake.npu_grouped_matmul([x], [w], scale=[scale], per_token_scale=[pts],
                                   group_list=torch.tensor([4, 6]), split_item=2, group_type=0,
                                   group_list_type=0, output_dtype=output_dtype)[0]


def test_emulated_pertoken_grouped_matmul_checks_dtypes(npu_emulation):
    out = _int8_call(npu_emulation, torch.float32, torch.float16)
    assert out.dtype == torch.float16 and out.shape == (6, 16)
    with pytest.raises(NPUArgumentError, match="scale dtype torch.float16"):
        _int8_call(npu_emulation, torch.float16, torch.float16)
    with pytest.raises(NPUArgumentError, match="needs output_dtype torch.bfloat16"):
        _int8_call(npu_emulation, torch.bfloat16, torch.float16)
    with pytest.raises(NPUArgumentError, match="per_token_scale must be float32"):
        _int8_call(npu_emulation, torch.float32, torch.float16, pts_rows=5)


def test_emulated_pseudo_quant_grouped_matmul_checks_scale_dtype(npu_emulation):
    x = torch.randn(4, 32).to(torch.bfloat16)
    w = torch.randint(-127, 128, (2, 32, 16), dtype=torch.int8)
    for bad in (torch.float16, torch.float32):
        with pytest.raises(NPUArgumentError, match="antiquant_scale dtype"):
            npu_emulation.npu_grouped_matmul([x], [w], antiquant_scale=[torch.rand(2, 16).to(bad)],
                                             group_list=torch.tensor([1, 4]), split_item=2, group_type=0)


def test_run_kernel_directly_matches_reference_math(npu_emulation):
    """run_weight_only on a hand-made layer: x @ (codes * scale) per expert, then SwiGLU, then down."""
    gen = torch.Generator().manual_seed(9)
    layer = torch.nn.Module()
    layer.quant_bits, layer.params_dtype = 8, torch.float16
    layer.expert_k = {"w13": 16, "w2": 8}
    layer.silu_and_mul = build_op_set("npu").get("silu_and_mul")
    layer.w13_weight = torch.nn.Parameter(torch.randint(-127, 128, (2, 16, 16), generator=gen, dtype=torch.int8),
                                          requires_grad=False)                                # [E, 2I, H]
    layer.w2_weight = torch.nn.Parameter(torch.randint(-127, 128, (2, 16, 8), generator=gen, dtype=torch.int8),
                                         requires_grad=False)                                 # [E, H, I]
    layer.w13_weight_scale = torch.nn.Parameter(torch.rand(2, 16, generator=gen) * 0.01, requires_grad=False)
    layer.w2_weight_scale = torch.nn.Parameter(torch.rand(2, 16, generator=gen) * 0.01, requires_grad=False)
    want_w13 = [layer.w13_weight[e].float() * layer.w13_weight_scale[e, :, None] for e in range(2)]   # [2I, H]
    want_w2 = [layer.w2_weight[e].float() * layer.w2_weight_scale[e, :, None] for e in range(2)]      # [H, I]
    npu_moe.prepare_weight_only(layer)
    x = torch.randn(5, 16, generator=gen).to(torch.float16)
    got = npu_moe.run_weight_only(layer, x, torch.tensor([2, 5]))
    rows = (slice(0, 2), slice(2, 5))
    want = torch.cat([torch.nn.functional.silu((x[r].float() @ want_w13[e].t())[:, :8])
                      * (x[r].float() @ want_w13[e].t())[:, 8:] @ want_w2[e].t() for e, r in enumerate(rows)])
    assert relative_to_range(got, want) < 0.01
