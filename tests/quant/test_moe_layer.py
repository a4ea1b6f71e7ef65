"""FusedMoE in every expert format: the layer vs an independent per-token reference, tensor
parallelism over the moe intermediate dim, expert weight bytes, and bad expert tensors."""
from __future__ import annotations

import pytest
import torch

from ascend_llm.layers.moe import FusedMoE
from ascend_llm.layers.moe_routing import RoutingConfig, select_experts
from ascend_llm.ops import build_op_set
from ascend_llm.quant.moe_base import UnquantizedFusedMoEMethod
from ascend_llm.quant.moe_fp8 import BlockFp8MoEMethod
from ascend_llm.quant.moe_w8a8 import W8A8DynamicMoEMethod
from ascend_llm.quant.moe_weight_only import OnlineWeightOnlyMoEMethod, PrequantWeightOnlyMoEMethod, WInt2MoEMethod
from tests.quant.moe_layer_fixtures import (FORMATS, Experts, build_layer, checkpoint_tensors, quant_config,
                                            reference_moe)

METHODS = {"float": UnquantizedFusedMoEMethod, "wint8": OnlineWeightOnlyMoEMethod,
           "wint4": OnlineWeightOnlyMoEMethod, "prequant_wint8": PrequantWeightOnlyMoEMethod,
           "prequant_wint4": PrequantWeightOnlyMoEMethod, "wint2": WInt2MoEMethod,
           "w8a8_dynamic": W8A8DynamicMoEMethod, "block_fp8": BlockFp8MoEMethod,
           "block_fp8_checkpoint": BlockFp8MoEMethod}


def _routing(num_tokens: int, num_experts: int, seed: int = 1):
    logits = torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(seed))
    return logits, *select_experts(logits, RoutingConfig(2, renormalize=True))


@pytest.mark.parametrize("fmt", FORMATS)
def test_layer_matches_per_token_reference(fmt):
    experts = Experts.random(6, 64, 32)
    layer = build_layer(fmt, experts)
    assert type(layer.quant_method) is METHODS[fmt]
    x = torch.randn(11, 64, generator=torch.Generator().manual_seed(2))
    logits, weights, ids = _routing(11, 6)
    got = layer(x, logits)
    want = reference_moe(fmt, experts, x, weights, ids)
    # same dequantized weights and activation rounding; fp32 summation order only (|y| ~ 0.1)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert want.abs().max() > 0.01


@pytest.mark.parametrize("fmt", ["wint8", "wint4", "wint2", "w8a8_dynamic", "block_fp8"])
def test_quantized_layer_is_close_to_float(fmt):
    experts = Experts.random(6, 128, 64, seed=4)
    x = torch.randn(16, 128, generator=torch.Generator().manual_seed(5))
    logits = torch.randn(16, 6, generator=torch.Generator().manual_seed(6))
    want = build_layer("float", experts)(x, logits)
    got = build_layer(fmt, experts)(x, logits)
    rel = float((got - want).norm() / want.norm())
    # measured relative errors (gaussian experts): wint8 0.006, w8a8 0.01, fp8 0.05, wint4 0.11, wint2 0.4
    bound = {"wint8": 0.02, "w8a8_dynamic": 0.03, "block_fp8": 0.1, "wint4": 0.2, "wint2": 0.6}[fmt]
    assert rel < bound, rel


def test_decode_touches_only_routed_experts(monkeypatch):
    """One token, top-2 of 64 experts: the grouped matmul runs two expert matmuls per projection."""
    from ascend_llm.ops import cpu_moe
    calls = []
    real = cpu_moe.grouped_apply

    def counting(x, group_list, n, expert_matmul, out_dtype=None):
        return real(x, group_list, n, lambda e, rows: calls.append(e) or expert_matmul(e, rows), out_dtype)
    monkeypatch.setattr(cpu_moe, "grouped_apply", counting)
    layer = build_layer("wint4", Experts.random(64, 32, 16))
    layer(torch.randn(1, 32), torch.randn(1, 64))
    assert len(calls) == 4 and len(set(calls)) == 2


# ---------------------------------------------------------------- tensor parallelism

@pytest.mark.parametrize("fmt,tp_size", [("float", 2), ("float", 4), ("prequant_wint8", 2),
                                         ("prequant_wint4", 2), ("wint2", 2), ("block_fp8_checkpoint", 2),
                                         ("w8a8_dynamic", 2)])
def test_tp_shards_sum_to_the_unsharded_layer(fmt, tp_size):
    inter = 256 if fmt == "wint2" else 64        # WINT2 splits down's k at 128-row scale bytes
    experts = Experts.random(4, 64, inter, seed=7)
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(8))
    logits = torch.randn(9, 4, generator=torch.Generator().manual_seed(9))
    full = build_layer(fmt, experts)(x, logits)
    shards = [build_layer(fmt, experts, tp_rank=r, tp_size=tp_size) for r in range(tp_size)]
    assert all(layer.intermediate_size_per_partition == inter // tp_size for layer in shards)
    total = sum(layer(x, logits) for layer in shards)
    if fmt == "w8a8_dynamic":
        # the activation after SwiGLU is quantized per token over each rank's slice of I, a
        # different (finer) scale than over all of I: close (measured 0.6%), not equal
        assert float((total - full).norm() / full.norm()) < 0.02
    else:
        torch.testing.assert_close(total, full, atol=1e-5, rtol=1e-4)


def test_tp_shard_holds_its_slice_of_each_expert():
    experts = Experts.random(3, 16, 8, seed=10)
    rank1 = build_layer("float", experts, tp_rank=1, tp_size=2)
    w13 = rank1.w13_weight.data.transpose(1, 2)        # back to [E, 2 * I/2, H]
    torch.testing.assert_close(w13[:, :4], experts.gate[:, 4:])
    torch.testing.assert_close(w13[:, 4:], experts.up[:, 4:])
    torch.testing.assert_close(rank1.w2_weight.data.transpose(1, 2), experts.down[:, :, 4:])


def test_tp_rejects_indivisible_intermediate():
    with pytest.raises(ValueError, match="not divisible by tp_size 3"):
        build_layer("float", Experts.random(2, 16, 8), tp_rank=0, tp_size=3)
    with pytest.raises(ValueError, match="multiple of 128"):
        build_layer("wint2", Experts.random(2, 64, 64), tp_rank=0, tp_size=2)


# ---------------------------------------------------------------- expert weight bytes

def _expert_bytes(layer) -> int:
    return sum(p.numel() * p.element_size() for name, p in layer.named_parameters()
               if name.startswith(("w13_", "w2_")))


def test_expert_weight_bytes_per_format():
    experts = Experts.random(4, 256, 128, seed=11)
    bf16 = experts.gate.numel() * 2 * 3                       # gate + up + down in bf16
    sizes = {fmt: _expert_bytes(build_layer(fmt, experts)) for fmt in FORMATS}
    assert sizes["float"] == 2 * bf16                          # fp32 model
    layer = build_layer("wint2", experts)
    codes = layer.w13_quant_weight.numel() + layer.w2_quant_weight.numel()
    assert codes * 8 == bf16                                   # 2 bits per weight: 1/8 of bf16
    assert sizes["wint2"] < bf16 / 8 * 1.35                    # + 4-bit group scales, per-channel side data
    assert bf16 / 4 <= sizes["wint4"] < bf16 / 4 * 1.05        # + fp32 per-channel scales
    assert bf16 / 2 <= sizes["wint8"] < bf16 / 2 * 1.05
    assert bf16 / 2 <= sizes["w8a8_dynamic"] < bf16 / 2 * 1.1  # + scale and offset [n, 1]
    assert bf16 / 2 <= sizes["block_fp8"] < bf16 / 2 * 1.02      # + fp32 per 16x16 block (1.6%)


# ---------------------------------------------------------------- bad expert tensors

def test_missing_wint2_expert_tensor_is_named():
    experts = Experts.random(3, 64, 32)
    prefix = "model.layers.8.mlp.experts"
    layer = FusedMoE(3, 64, 32, RoutingConfig(2), torch.float32, quant_config("wint2", prefix, 3), prefix,
                     build_op_set("cpu"))
    for name, tensor in checkpoint_tensors("wint2", experts, prefix).items():
        if name != f"{prefix}.2.down_proj.code_zp":
            layer.load_checkpoint_tensor(name, tensor)
    with pytest.raises(ValueError, match=f"missing tensor '{prefix}.2.down_proj.code_zp'"):
        layer.quant_method.process_weights_after_loading(layer)


def test_wrong_dtype_and_unknown_suffix():
    experts = Experts.random(2, 64, 32)
    prefix = "model.layers.8.mlp.experts"
    tensors = checkpoint_tensors("prequant_wint8", experts, prefix)
    layer = build_layer("prequant_wint8", experts)
    with pytest.raises(ValueError, match="has dtype torch.float32, expected torch.int8"):
        layer.load_checkpoint_tensor(f"{prefix}.0.gate_proj.weight", tensors[f"{prefix}.0.gate_proj.weight"].float())
    with pytest.raises(ValueError, match="unexpected expert tensor.*weight_scale"):
        layer.load_checkpoint_tensor(f"{prefix}.0.gate_proj.input_scale", torch.ones(1))
