"""Tiny MoE checkpoints written in each quantized format load through the normal path
(`get_quant_config` from the directory, as the engine does) and stay close to the float model."""
from __future__ import annotations

import pytest
import torch

from ascend_llm import LLM, SamplingParams
from ascend_llm.layers.linear import LinearBase
from ascend_llm.loader import iter_safetensors_weights, load_hf_config
from ascend_llm.models.registry import get_model_class
from ascend_llm.models.weight_utils import fused_shards, process_weights_after_loading
from ascend_llm.ops import build_op_set
from ascend_llm.quant.moe_fp8 import BlockFp8MoEMethod
from ascend_llm.quant.moe_w8a8 import W8A8DynamicMoEMethod
from ascend_llm.quant.moe_weight_only import OnlineWeightOnlyMoEMethod, PrequantWeightOnlyMoEMethod, WInt2MoEMethod
from ascend_llm.quant.registry import get_quant_config
from ascend_llm.quant.weight_only import PrequantWeightOnlyLinearMethod
from tests.models.test_logits_vs_transformers import run_chunks
from tests.quant.moe_checkpoints import write_w4w2, write_w8a8_dynamic
from tests.quant.prequant_writers import write_deepseek_fp8, write_fastdeploy_weight_only
from tests.tiny_models import make_tiny_moe_model_dir

TOKENS = torch.randint(3, 300, (23,), generator=torch.Generator().manual_seed(1)).tolist()


def build(model_dir, quantization=None):
    """As the engine's model runner: quant config from the name and the directory, load, process."""
    config = load_hf_config(model_dir)
    cls = get_model_class(config)
    quant = get_quant_config(quantization, config, model_dir, fused_shards(cls.packed_modules_mapping))
    model = cls(config, build_op_set("cpu"), quant, torch.float32)
    model.load_weights(iter_safetensors_weights(model_dir))
    process_weights_after_loading(model)
    return config, model.eval()


def relative_error(model_dir, quantization, reference) -> float:
    config, model = build(model_dir, quantization)
    got = run_chunks(model, config, TOKENS, [23])
    return float((got - reference).norm() / reference.norm())


@pytest.fixture(scope="module")
def ernie(tmp_path_factory):
    """9 decoder layers: layer 0 dense, 1..6 in FastDeploy's w4 range, 7..8 in its w2 range."""
    src = make_tiny_moe_model_dir(tmp_path_factory.mktemp("ernie9"), "ernie4_5_moe", num_layers=9)
    config, model = build(src)
    return src, run_chunks(model, config, TOKENS, [23])


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    src = make_tiny_moe_model_dir(tmp_path_factory.mktemp("qwen3q"), "qwen3_moe")
    config, model = build(src)
    return src, run_chunks(model, config, TOKENS, [23])


def _experts(model):
    return [layer.mlp.experts for layer in model.model.layers if hasattr(layer.mlp, "experts")]


def test_w4w2_fastdeploy_checkpoint(ernie, tmp_path):
    src, reference = ernie
    out = write_w4w2(src, tmp_path / "w4w2")
    _, model = build(out)
    methods = [type(e.quant_method) for e in _experts(model)]
    assert methods == [PrequantWeightOnlyMoEMethod] * 6 + [WInt2MoEMethod] * 2
    assert all(e.quant_method.bits == 4 for e in _experts(model)[:6])
    dense = [m for m in model.modules() if isinstance(m, LinearBase) and m.quant_method is not None
             and not m.prefix.endswith(("mlp.gate",))]
    assert all(isinstance(m.quant_method, PrequantWeightOnlyLinearMethod) and m.quant_method.bits == 8
               for m in dense)
    # measured 0.12 (2-bit experts on two of nine layers, 4-bit on six, int8 dense)
    assert relative_error(out, None, reference) < 0.25


def test_w4w2_missing_wint2_tensor_is_named(ernie, tmp_path):
    src, _ = ernie
    out = write_w4w2(src, tmp_path / "w4w2_bad", drop="layers.8.mlp.experts.3.up_gate_proj.super_scales")
    with pytest.raises(ValueError, match=r"model\.layers\.8\.mlp\.experts\.3\.gate_proj\.super_scales"):
        build(out)


@pytest.mark.parametrize("name,bound", [("wint8", 0.1), ("wint4", 0.7), ("block_wise_fp8", 0.35)])
def test_online_methods(qwen3, ernie, name, bound):
    # measured (qwen3 / ernie): wint8 0.016 / 0.046, wint4 0.33 / 0.50 (dense layers int4 too),
    # block_wise_fp8 0.10 / 0.19
    for src, reference in (qwen3, ernie):
        _, model = build(src, name)
        method = BlockFp8MoEMethod if name == "block_wise_fp8" else OnlineWeightOnlyMoEMethod
        assert all(type(e.quant_method) is method for e in _experts(model))
        assert relative_error(src, name, reference) < bound


@pytest.mark.parametrize("arch", ["qwen3", "ernie"])
def test_w8a8_dynamic_checkpoint(arch, qwen3, ernie, tmp_path):
    src, reference = {"qwen3": qwen3, "ernie": ernie}[arch]
    out = write_w8a8_dynamic(src, tmp_path / "w8a8")
    _, model = build(out)
    assert all(type(e.quant_method) is W8A8DynamicMoEMethod for e in _experts(model))
    assert relative_error(out, None, reference) < 0.1      # measured 0.037 / 0.050


def test_block_fp8_checkpoint(qwen3, tmp_path):
    src, reference = qwen3
    out = write_deepseek_fp8(src, tmp_path / "fp8", block=(16, 16))
    _, model = build(out)
    assert all(type(e.quant_method) is BlockFp8MoEMethod and not e.quant_method.online for e in _experts(model))
    assert relative_error(out, None, reference) < 0.2       # measured 0.089


def test_prequant_wint4_checkpoint(qwen3, tmp_path):
    src, reference = qwen3
    out = write_fastdeploy_weight_only(src, tmp_path / "fd4", 4, int4_as_int8=True)
    _, model = build(out)
    assert all(type(e.quant_method) is PrequantWeightOnlyMoEMethod for e in _experts(model))
    assert relative_error(out, None, reference) < 0.7       # measured 0.33, as online wint4


def test_llm_generates_from_w4w2_checkpoint(ernie, tmp_path):
    src, _ = ernie
    out = write_w4w2(src, tmp_path / "w4w2_llm")
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    quant = LLM(str(out), max_model_len=128).generate(prompt_token_ids=[TOKENS[:9]], sampling_params=greedy,
                                                       use_tqdm=False)
    ref = LLM(str(src), max_model_len=128).generate(prompt_token_ids=[TOKENS[:9]], sampling_params=greedy,
                                                     use_tqdm=False)
    assert len(quant[0].outputs[0].token_ids) == 6
    assert quant[0].outputs[0].token_ids[0] == ref[0].outputs[0].token_ids[0]


def test_per_tensor_fp8_moe_is_rejected(qwen3):
    with pytest.raises(ValueError, match="per-tensor fp8 MoE experts are not supported"):
        build(qwen3[0], "fp8")
