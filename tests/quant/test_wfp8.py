"""WFP8AFP8_DYNAMIC (MoFQ's FP8 layers in msModelSlim descriptions): e4m3 weight [n, k] with a
per-channel float32 weight_scale [n, 1], e4m3 activations per token."""
from __future__ import annotations

import pytest
import torch

from ascend_llm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from ascend_llm.quant.w8a8 import (AscendW8A8Config, WFp8AFp8DynamicLinearMethod,
                                   wfp8_dynamic_matmul_reference)

HIDDEN, HEAD_DIM, HEADS, KV_HEADS = 64, 16, 4, 2
SHARDS = {"qkv": {"q": 64, "k": 32, "v": 32}, "gate_up": {0: 48, 1: 48}, "row": {None: 40}}
NAMES = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "o_proj")


def config(group_size: int = 0) -> AscendW8A8Config:
    return AscendW8A8Config({"model_quant_type": "W8A8_DYNAMIC", "group_size": group_size,
                             **{f"m.{n}.weight": "WFP8AFP8_DYNAMIC" for n in NAMES}})


def layer_of(kind: str, bias: bool):
    if kind == "qkv":
        return QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, KV_HEADS, bias, torch.float32, config(), "m.qkv_proj")
    if kind == "gate_up":
        return MergedColumnParallelLinear(HIDDEN, [48, 48], bias, torch.float32, config(), "m.gate_up_proj")
    return RowParallelLinear(HIDDEN, 40, bias, torch.float32, config(), "m.o_proj")


def fp8_weight(rows: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(float weight, e4m3 weight, scale [rows, 1]) with per-channel scale = amax / 448."""
    w = torch.randn(rows, HIDDEN, generator=gen) * torch.rand(rows, 1, generator=gen)
    scale = w.abs().amax(dim=1, keepdim=True) / 448
    return w, (w / scale).to(torch.float8_e4m3fn), scale


def independent_reference(x: torch.Tensor, q_w: torch.Tensor, scale: torch.Tensor,
                          bias: torch.Tensor | None) -> torch.Tensor:
    """Written from the definition with torch's own e4m3 casts, accumulated in float64."""
    token_scale = (x.abs().amax(dim=1, keepdim=True) / 448).clamp_min(1 / (448 * 512))   # [T, 1]
    q_x = (x / token_scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    out = (q_x.double() @ q_w.double().T) * token_scale.double() * scale.double().T
    return out if bias is None else out + bias.double()


@pytest.mark.parametrize("kind", ["qkv", "gate_up", "row"])
@pytest.mark.parametrize("bias", [False, True])
def test_loaded_layer_matches_the_definition(kind, bias):
    gen = torch.Generator().manual_seed(7)
    layer = layer_of(kind, bias)
    assert isinstance(layer.quant_method, WFp8AFp8DynamicLinearMethod)
    params = dict(layer.named_parameters())
    floats, weights, scales, biases = [], [], [], []
    for shard, rows in SHARDS[kind].items():
        w, q_w, scale = fp8_weight(rows, gen)
        params["weight"].weight_loader(params["weight"], q_w, shard)
        params["weight_scale"].weight_loader(params["weight_scale"], scale, shard)
        if bias:
            b = torch.randn(rows, generator=gen)
            params["bias"].weight_loader(params["bias"], b, shard)
            biases.append(b)
        floats.append(w), weights.append(q_w), scales.append(scale)
    layer.quant_method.process_weights_after_loading(layer)
    q_w, scale = torch.cat(weights), torch.cat(scales)
    b = torch.cat(biases) if bias else None
    for tokens in (1, 5, 33):
        x = torch.randn(tokens, HIDDEN, generator=gen) * 4
        got = layer(x)
        want = independent_reference(x, q_w, scale, b)
        assert got.dtype == torch.float32 and got.shape == (tokens, q_w.shape[0])
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-4)
        exact = torch.nn.functional.linear(x, torch.cat(floats), b)
        assert float((got - exact).norm() / exact.norm()) < 0.08      # e4m3: 3 mantissa bits


def test_reference_handles_zero_tokens_and_3d_inputs():
    gen = torch.Generator().manual_seed(3)
    _, q_w, scale = fp8_weight(24, gen)
    x = torch.randn(4, HIDDEN, generator=gen)
    x[1] = 0                                                      # an all-zero token stays finite
    out = wfp8_dynamic_matmul_reference(x, q_w, scale.reshape(-1), None)
    assert bool(torch.isfinite(out).all()) and torch.equal(out[1], torch.zeros(24))
    layer = layer_of("row", False)
    params = dict(layer.named_parameters())
    _, q_w, scale = fp8_weight(40, gen)
    params["weight"].weight_loader(params["weight"], q_w)
    params["weight_scale"].weight_loader(params["weight_scale"], scale)
    layer.quant_method.process_weights_after_loading(layer)
    x3 = torch.randn(2, 3, HIDDEN, generator=gen)
    assert torch.allclose(layer(x3), layer(x3.reshape(6, HIDDEN)).reshape(2, 3, 40))


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="per-group"):
        config(group_size=64).get_quant_method(None, "m.o_proj")
    layer = layer_of("row", False)
    layer.weight_scale.data.fill_(float("nan"))
    with pytest.raises(ValueError, match="m.o_proj.weight_scale"):
        layer.quant_method.process_weights_after_loading(layer)
    mixed = AscendW8A8Config({"model_quant_type": "W8A8_DYNAMIC", "m.gate_proj.weight": "WFP8AFP8_DYNAMIC",
                              "m.up_proj.weight": "W8A8_DYNAMIC"})
    with pytest.raises(ValueError, match="different quant types"):
        mixed.get_quant_method(None, "m.gate_up_proj")


def test_vllm_ascend_name_and_its_zero_weight_offset():
    """vllm-ascend's W8A8FP8_DYNAMIC (methods/w8a8fp8_dynamic.py) is the same scheme with a
    weight_offset [n, 1]: zero offsets are dropped after loading, others are refused by name."""
    cfg = AscendW8A8Config({"model_quant_type": "W8A8FP8_DYNAMIC", "m.o_proj.weight": "W8A8FP8_DYNAMIC"})
    gen = torch.Generator().manual_seed(5)
    _, q_w, scale = fp8_weight(40, gen)
    for offset, error in ((0.0, None), (1.0, r"m.o_proj.weight_offset: FP8 dynamic weights must be symmetric")):
        layer = RowParallelLinear(HIDDEN, 40, False, torch.float32, cfg, "m.o_proj")
        assert isinstance(layer.quant_method, WFp8AFp8DynamicLinearMethod)
        for name, value in (("weight", q_w), ("weight_scale", scale), ("weight_offset", torch.full((40, 1), offset))):
            getattr(layer, name).weight_loader(getattr(layer, name), value)
        if error is None:
            layer.quant_method.process_weights_after_loading(layer)
            assert not hasattr(layer, "weight_offset")
            x = torch.randn(3, HIDDEN, generator=gen)
            assert torch.allclose(layer(x).double(), independent_reference(x, q_w, scale, None), atol=1e-4)
        else:
            with pytest.raises(ValueError, match=error):
                layer.quant_method.process_weights_after_loading(layer)
