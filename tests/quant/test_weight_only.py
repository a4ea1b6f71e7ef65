"""wint8 / wint4: layers load float weights through their weight_loader, quantize after loading,
and apply() equals x @ dequantized(W).T (+ bias) on odd shapes; float error stays within the
worst-case rounding bound."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ascend_llm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, ReplicatedLinear
from ascend_llm.numerics import primitives as P
from ascend_llm.quant.registry import get_quant_config
from ascend_llm.quant.weight_only import WeightOnlyLinearMethod, WInt4Config, WInt8Config
from tests.quant.linear_fixtures import OPS, gen as _gen
from tests.quant.linear_fixtures import loaded_linear



def _dequantized(layer, bits: int, k: int) -> torch.Tensor:
    q = P.unpack_int4(layer.weight, k) if bits == 4 else layer.weight
    return P.dequantize_per_channel(q, layer.weight_scale)              # [n, k]


@pytest.mark.parametrize("config, bits, kernel", [(WInt8Config(), 8, "cpu.weight_only_matmul"),
                                                  (WInt4Config(), 4, "cpu.weight_only_matmul_split"),
                                                  (WInt4Config(), 4, "cpu.weight_only_matmul")])
@pytest.mark.parametrize("num_tokens", [1, 7, 33])
@pytest.mark.parametrize("k, n", [(576, 96), (96, 130), (130, 576), (33, 7)])
def test_apply_matches_dequantized_reference(config, bits, kernel, num_tokens, k, n, monkeypatch):
    if kernel == "cpu.weight_only_matmul":       # the reference: disable the faster variant
        monkeypatch.setenv("ASCEND_LLM_DISABLE_KERNELS", "cpu.weight_only_matmul_split")
    layer, w, b = _loaded_linear(config, k, n, bias=num_tokens == 7, seed=k * n + bits)
    expected_weight_shape = (n, k) if bits == 8 else (n, (k + 1) // 2)
    assert layer.weight.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert tuple(layer.weight.shape) == expected_weight_shape
    assert layer.weight_scale.shape == (n,) and layer.weight_scale.dtype == torch.float32
    assert layer.weight_only_kernel.name == kernel
    x = torch.randn(num_tokens, k, generator=_gen(num_tokens))
    y = layer(x)
    deq = _dequantized(layer, bits, k)
    torch.testing.assert_close(y, F.linear(x, deq, b), rtol=1e-5, atol=1e-5)
    # vs the float layer: each weight is off by at most scale_n / 2, so |dy| <= |x| @ (scale / 2)
    bound = x.abs() @ (layer.weight_scale[None, :].expand(k, n) / 2)
    assert ((y - F.linear(x, w, b)).abs() <= bound + 1e-5).all()


def test_bfloat16_activations_keep_dtype():
    layer = ReplicatedLinear(130, 96, bias=True, params_dtype=torch.bfloat16, quant_config=WInt8Config(), ops=OPS)
    w = torch.randn(96, 130, generator=_gen(3)).to(torch.bfloat16)
    layer.weight.weight_loader(layer.weight, w)
    layer.bias.weight_loader(layer.bias, torch.zeros(96, dtype=torch.bfloat16))
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(7, 130, generator=_gen(4)).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = F.linear(x.float(), P.dequantize_per_channel(layer.weight, layer.weight_scale))
    torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=1e-2)   # bf16 output rounding


def test_fused_qkv_and_gate_up_quantize_per_output_row():
    qkv = QKVParallelLinear(64, 16, 4, 2, quant_config=WInt4Config(), prefix="attn.qkv_proj", ops=OPS)
    parts = {s: torch.randn(r, 64, generator=_gen(i)) * (10 ** i) for i, (s, r) in
             enumerate([("q", 64), ("k", 32), ("v", 32)])}           # very different magnitudes per shard
    for shard, t in parts.items():
        qkv.weight.weight_loader(qkv.weight, t, shard)
    qkv.quant_method.process_weights_after_loading(qkv)
    full = torch.cat(list(parts.values()))                           # [128, 64]
    torch.testing.assert_close(qkv.weight_scale, full.abs().amax(1) / 7)
    gate_up = MergedColumnParallelLinear(64, [96, 96], quant_config=WInt8Config(), ops=OPS)
    for i in range(2):
        gate_up.weight.weight_loader(gate_up.weight, torch.randn(96, 64, generator=_gen(10 + i)), i)
    gate_up.quant_method.process_weights_after_loading(gate_up)
    assert gate_up.weight.shape == (192, 64) and gate_up.weight_scale.shape == (192,)


def test_float_weight_is_freed_and_double_processing_is_rejected():
    layer, _, _ = _loaded_linear(WInt8Config(), 64, 32, bias=False, seed=1)
    assert [name for name, p in layer.named_parameters() if p.is_floating_point() and p.dim() == 2] == []
    with pytest.raises(ValueError, match="down_proj.weight: already quantized"):
        layer.quant_method.process_weights_after_loading(layer)


def test_layer_without_ops_uses_reference():
    layer, w, _ = _loaded_linear(WInt4Config(), 96, 33, bias=False, seed=2, ops=None)
    assert layer.weight_only_kernel is None
    x = torch.randn(5, 96, generator=_gen(6))
    torch.testing.assert_close(layer(x), F.linear(x, _dequantized(layer, 4, 96)), rtol=1e-5, atol=1e-5)


def test_unsupported_bits_rejected():
    with pytest.raises(ValueError, match="bits"):
        WeightOnlyLinearMethod(2)
    with pytest.raises(ValueError, match="cpu.weight_only_matmul_split: bits=3.*cpu.weight_only_matmul: bits=3.*"
                                         "cpu.weight_only_matmul_wint2: bits=3 .WINT2 only"):
        OPS.select("weight_only_matmul", bits=3)
    assert OPS.select("weight_only_matmul", bits=2).name == "cpu.weight_only_matmul_wint2"


@pytest.mark.parametrize("name, cls", [("wint8", WInt8Config), ("WINT4", WInt4Config)])
def test_registry_names(name, cls):
    config = get_quant_config(name, None)
    assert isinstance(config, cls) and config.get_name() == name.lower()


def _loaded_linear(config, k: int, n: int, bias: bool, seed: int, ops=OPS) -> tuple:
    return loaded_linear(config, k, n, bias, seed, ops, prefix="model.layers.0.mlp.down_proj")
