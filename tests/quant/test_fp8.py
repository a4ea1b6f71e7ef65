"""fp8 (per-tensor) and block_wise_fp8 (128x128): apply() equals the dequantize-both reference on
odd shapes, including partial 128-blocks (576 = 4.5 x 128, 130, 96), and stays close to float."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ascend_llm.layers.linear import QKVParallelLinear, ReplicatedLinear
from ascend_llm.numerics import primitives as P
from ascend_llm.quant.fp8 import BlockWiseFp8Config, Fp8Config
from ascend_llm.quant.registry import get_quant_config
from tests.quant.linear_fixtures import OPS, gen as _gen
from tests.quant.linear_fixtures import loaded_linear as _loaded_linear

SHAPES = [(576, 96), (96, 130), (130, 576), (33, 7)]   # (k, n)


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).norm() / ref.norm())


@pytest.fixture(params=["fast", "reference"])
def kernel_variant(request, monkeypatch) -> str:
    """Run each apply test with the faster CPU kernels and, disabling them, with the references."""
    if request.param == "reference":
        monkeypatch.setenv("ASCEND_LLM_DISABLE_KERNELS", "cpu.fp8_matmul_per_tensor_fast,cpu.fp8_matmul_block_fast")
        return ""
    return "_fast"


@pytest.mark.parametrize("num_tokens", [1, 7, 33])
@pytest.mark.parametrize("k, n", SHAPES)
def test_fp8_per_tensor_matches_reference(num_tokens, k, n, kernel_variant):
    layer, w, b = _loaded_linear(Fp8Config(), k, n, bias=num_tokens == 7, seed=k + n)
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight.shape == (n, k)
    assert layer.weight_scale.dim() == 0
    torch.testing.assert_close(layer.weight_scale, w.abs().max() / 448)
    assert layer.fp8_kernel.name == "cpu.fp8_matmul_per_tensor" + kernel_variant
    x = torch.randn(num_tokens, k, generator=_gen(num_tokens)) * 2
    y = layer(x)
    xq, sx = P.quantize_fp8_per_tensor(x, min_scale=P.FP8_MIN_SCALE)
    ref = F.linear(P.dequantize_fp8(xq, sx), P.dequantize_fp8(layer.weight, layer.weight_scale), b)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    # two e4m3 roundings (<= 2**-4 relative each, ~2**-6 rms): the output is a few % off float
    assert _rel_err(y, F.linear(x, w, b)) < 0.06


@pytest.mark.parametrize("num_tokens", [1, 7, 33])
@pytest.mark.parametrize("k, n", SHAPES)
def test_block_fp8_matches_reference(num_tokens, k, n, kernel_variant):
    layer, w, b = _loaded_linear(BlockWiseFp8Config(), k, n, bias=num_tokens == 7, seed=k * n)
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight.shape == (n, k)
    assert layer.weight_scale_inv.shape == (-(-n // 128), -(-k // 128))
    assert layer.fp8_kernel.name == "cpu.fp8_matmul_block" + kernel_variant
    x = torch.randn(num_tokens, k, generator=_gen(num_tokens)) * torch.logspace(-1, 1, k)  # uneven channels
    y = layer(x)
    xq, sx = P.quantize_fp8_per_token_group(x, 128)
    ref = F.linear(P.dequantize_fp8_per_token_group(xq, sx, 128),
                   P.dequantize_fp8_block(layer.weight, layer.weight_scale_inv), b)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert _rel_err(y, F.linear(x, w, b)) < 0.06


def test_block_fp8_outlier_block_does_not_hurt_other_blocks():
    # per-tensor fp8 spends its range on one outlier; 128x128 blocks confine it to its block
    k, n = 256, 256
    w = torch.randn(n, k, generator=_gen(8)) * 0.01
    w[0, 0] = 1e4
    q, scale_inv = P.quantize_fp8_block(w)
    deq = P.dequantize_fp8_block(q, scale_inv)
    assert _rel_err(deq[128:], w[128:]) < 0.03
    q_t, s_t = P.quantize_fp8_per_tensor(w)
    assert _rel_err(P.dequantize_fp8(q_t, s_t)[128:], w[128:]) > 0.3


def test_fused_qkv_gets_one_scale_per_layer():
    qkv = QKVParallelLinear(64, 16, 4, 2, quant_config=Fp8Config(), prefix="attn.qkv_proj", ops=OPS)
    parts = [torch.randn(r, 64, generator=_gen(r + i)) for i, r in enumerate([64, 32, 32])]
    for shard, t in zip("qkv", parts):
        qkv.weight.weight_loader(qkv.weight, t, shard)
    qkv.quant_method.process_weights_after_loading(qkv)
    torch.testing.assert_close(qkv.weight_scale, torch.cat(parts).abs().max() / 448)


@pytest.mark.parametrize("config", [Fp8Config(), BlockWiseFp8Config()])
def test_bf16_activations_keep_dtype_and_bare_layer_uses_reference(config):
    layer = ReplicatedLinear(130, 96, params_dtype=torch.bfloat16, quant_config=config)   # no ops
    layer.weight.weight_loader(layer.weight, torch.randn(96, 130, generator=_gen(1)).to(torch.bfloat16))
    layer.quant_method.process_weights_after_loading(layer)
    assert layer.fp8_kernel is None
    x = torch.randn(7, 130, generator=_gen(2)).to(torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="already fp8"):
        layer.quant_method.process_weights_after_loading(layer)


def test_unknown_scheme_lists_reasons():
    with pytest.raises(ValueError, match="cpu.fp8_matmul_per_tensor_fast: scheme='channel'.*"
                                         "cpu.fp8_matmul_block: scheme='channel'"):
        OPS.select("fp8_matmul", scheme="channel")


@pytest.mark.parametrize("name, cls", [("fp8", Fp8Config), ("Block_Wise_FP8", BlockWiseFp8Config)])
def test_registry_names(name, cls):
    config = get_quant_config(name, None)
    assert isinstance(config, cls) and config.get_name() == name.lower()


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown method 'int3'.*wint8.*block_wise_fp8"):
        get_quant_config("int3")
    with pytest.raises(ValueError, match="'wint2' needs a checkpoint in that format.*calib.wint2.writer"):
        get_quant_config("wint2")
    for name in ("w8a8", "W8A8_DYNAMIC", "ascend"):   # these need an msModelSlim checkpoint
        with pytest.raises(ValueError, match="quant_model_description"):
            get_quant_config(name)
    assert get_quant_config(None) is None and get_quant_config("none") is None

    class PreQuantized:
        quantization_config = {"quant_method": "fp8", "activation_scheme": "dynamic",
                               "weight_block_size": [128, 128]}
    with pytest.raises(ValueError, match="already quantized.*'fp8'.*loading it as 'wint8'"):
        get_quant_config("wint8", PreQuantized())
    # a pre-quantized checkpoint loads under its own name (tests/quant/test_prequantized.py)
    assert get_quant_config("block_wise_fp8", PreQuantized()).weight_block_size == (128, 128)


@pytest.mark.parametrize("num_tokens", [1, 7])
def test_fp8_static_input_scale_matches_reference(num_tokens):
    # online weights with a fixed activation scale (the AutoFP8 static path): x_q = e4m3(x / s)
    k, n, s = 130, 96, 0.004
    config = Fp8Config(input_scales={"model.layers.0.self_attn.o_proj": s})
    static, w, b = _loaded_linear(config, k, n, bias=True, seed=3)
    assert static.fp8_kernel.name == "cpu.fp8_matmul_per_tensor_static"
    assert float(static.input_scale) == pytest.approx(s)
    x = torch.randn(num_tokens, k, generator=_gen(num_tokens + 40))
    x[0, 0] = 10.0                                          # 10 / s = 2500 > 448: saturates
    xq = P.fp8_cast(x / torch.tensor(s))
    ref = F.linear(xq.float() * s, P.dequantize_fp8(static.weight, static.weight_scale), b)
    torch.testing.assert_close(static(x), ref, rtol=1e-5, atol=1e-5)
    assert float(xq.float().abs().max()) == 448.0
    with pytest.raises(ValueError, match="input_scale: must be finite and > 0"):
        Fp8Config(input_scales={"p": 0.0}).get_quant_method(static, "p")
