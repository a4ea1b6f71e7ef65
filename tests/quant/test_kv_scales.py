"""KV-cache scales: checkpoint names, resolution rules, the legacy JSON file, first-batch calculation."""
from __future__ import annotations

import json

import pytest
import torch

from ascend_llm.layers.attention import Attention
from ascend_llm.layers.kv_scales import (bind_kv_cache_scales, calculate_kv_scales, checkpoint_kv_cache_dtype,
                                         kv_scale_key, load_kv_scale, load_kv_scales_json, resolve_kv_scales)
from ascend_llm.ops import AttentionMetadata, build_op_set

H, D = 2, 4       # num_kv_heads, head_dim
ATTN = "model.layers.3.self_attn"


@pytest.mark.parametrize("suffix, key", [
    ("k_scale", "k_scale"), ("v_scale", "v_scale"), ("attn.k_scale", "k_scale"), ("kv_scale", "kv_scale"),
    ("k_proj.output_scale", "k_scale"), ("v_proj.output_scale", "v_scale"),
    ("k_proj.kv_cache_scale", "c8_k_scale"), ("k_proj.kv_cache_offset", "c8_k_offset"),
    ("v_proj.kv_cache_scale", "c8_v_scale"), ("v_proj.kv_cache_offset", "c8_v_offset"),
    ("cachek_matmul.activation_scale", "fd_k_act"), ("cachev_matmul.activation_scale", "fd_v_act"),
    ("q_scale", None), ("attn.prob_scale", None), ("q_proj.output_scale", None),
])
def test_kv_scale_names_map_to_the_attention_layer(suffix, key):
    assert kv_scale_key(f"{ATTN}.{suffix}") == (ATTN, key)


@pytest.mark.parametrize("name", [f"{ATTN}.k_proj.weight", f"{ATTN}.k_proj.input_scale", "model.norm.weight",
                                  "model.layers.0.mlp.down_proj.weight_scale", "lm_head.weight"])
def test_other_tensors_are_not_kv_scales(name):
    assert kv_scale_key(name) is None


def test_fastdeploy_zero_point_is_rejected_by_name():
    with pytest.raises(ValueError, match="cachek_matmul.activation_zero_point.*not supported"):
        kv_scale_key(f"{ATTN}.cachek_matmul.activation_zero_point")


def test_vllm_scales_per_tensor_and_duplicated_kv_scale():
    k, v = torch.rand(1) + 0.01, torch.rand(1) + 0.01
    scales, source = resolve_kv_scales({"k_scale": k, "v_scale": v}, "fp8", H, D, ATTN)
    assert source == "checkpoint k_scale/v_scale"
    assert torch.equal(scales.k_scale, k) and torch.equal(scales.v_scale, v) and scales.k_offset is None
    single = torch.rand(()) + 0.01
    scales, _ = resolve_kv_scales({"kv_scale": single}, "fp8", H, D, ATTN)
    assert scales.k_scale.item() == scales.v_scale.item() == single.item()
    scales, _ = resolve_kv_scales({"k_scale": k}, "fp8", H, D, ATTN)          # lone k: duplicated (vLLM)
    assert torch.equal(scales.v_scale, k)


def test_per_head_scales_expand_to_channels_and_int8_rescales_fp8_convention():
    per_head = torch.rand(H) + 0.01
    scales, _ = resolve_kv_scales({"k_scale": per_head, "v_scale": per_head}, "int8", H, D, ATTN)
    assert scales.k_scale.shape == (H, D)
    assert torch.allclose(scales.k_scale[:, 0], per_head * 448 / 127)
    assert torch.equal(scales.k_scale[:, 0], scales.k_scale[:, -1])


def test_c8_per_channel_scale_and_offset():
    loaded = {"c8_k_scale": torch.rand(H * D) + 0.01, "c8_k_offset": torch.randint(-9, 9, (H * D,)).float(),
              "c8_v_scale": torch.rand(H * D, 1) + 0.01, "c8_v_offset": torch.randint(-9, 9, (H * D, 1)).float()}
    scales, source = resolve_kv_scales(loaded, "int8", H, D, ATTN)
    assert source == "msModelSlim C8"
    for field in ("k_scale", "k_offset", "v_scale", "v_offset"):
        assert torch.equal(getattr(scales, field), loaded[f"c8_{field}"].view(H, D)), field


def test_c8_errors_name_the_problem():
    loaded = {"c8_k_scale": torch.rand(H * D) + 0.01, "c8_k_offset": torch.zeros(H * D),
              "c8_v_scale": torch.rand(H * D) + 0.01}
    with pytest.raises(ValueError, match=f"{ATTN}: msModelSlim C8 checkpoint lacks v_proj.kv_cache_offset"):
        resolve_kv_scales(loaded, "int8", H, D, ATTN)
    with pytest.raises(ValueError, match="use kv_cache_dtype 'int8', not 'fp8'"):
        resolve_kv_scales(loaded, "fp8", H, D, ATTN)
    loaded["c8_v_offset"] = torch.zeros(H * D + 1)
    with pytest.raises(ValueError, match=r"v_proj.kv_cache_offset: 9 values; expected 1, num_kv_heads=2"):
        resolve_kv_scales(loaded, "int8", H, D, ATTN)


def test_fastdeploy_activation_bound_becomes_dequant_scale():
    act = torch.rand(H * D) * 5 + 0.5
    scales, _ = resolve_kv_scales({"fd_k_act": act, "fd_v_act": act * 2}, "int8", H, D, ATTN)
    assert torch.allclose(scales.k_scale, (act / 127).view(H, D))
    assert torch.allclose(scales.v_scale, (act * 2 / 127).view(H, D))
    scales, _ = resolve_kv_scales({"fd_k_act": act[:H], "fd_v_act": act[:H]}, "fp8", H, D, ATTN)   # per kv head
    assert torch.allclose(scales.k_scale[:, 1], act[:H] / 448)


@pytest.mark.parametrize("bad", [torch.tensor([0.0]), torch.tensor([-1.0]), torch.tensor([float("nan")])])
def test_non_positive_scales_are_rejected(bad):
    with pytest.raises(ValueError, match=f"{ATTN}.k_scale: KV scales must be positive and finite"):
        resolve_kv_scales({"k_scale": bad, "v_scale": torch.ones(1)}, "fp8", H, D, ATTN)


def test_nothing_loaded_resolves_to_none():
    assert resolve_kv_scales({}, "fp8", H, D, ATTN) == (None, None)


def test_calculate_kv_scales_uses_vllm_constants_and_int8_amax():
    k, v = torch.randn(9, H, D), torch.randn(9, H, D) * 3
    fp8 = calculate_kv_scales(k, v, "fp8")
    assert torch.allclose(fp8.k_scale, k.abs().amax() / 200) and torch.allclose(fp8.v_scale, v.abs().amax() / 100)
    int8 = calculate_kv_scales(k, v, "int8")
    assert torch.allclose(int8.k_scale, k.abs().amax() / 127) and int8.k_offset is None
    zero = calculate_kv_scales(torch.zeros(2, H, D), torch.zeros(2, H, D), "int8")
    assert zero.k_scale.item() > 0                       # no division by zero on an all-zero batch


def _write_json(path, doc):
    path.write_text(json.dumps(doc))
    return path


def _legacy_doc(num_layers, dtype="float8_e4m3fn", model_type="llama"):
    return {"model_type": model_type,
            "kv_cache": {"dtype": dtype, "scaling_factor": {"0": {str(i): 0.01 * (i + 1) for i in range(num_layers)}}}}


def test_legacy_json_reads_per_layer_scales(tmp_path):
    path = _write_json(tmp_path / "kv.json", _legacy_doc(3))
    assert load_kv_scales_json(path, 3, "llama") == pytest.approx([0.01, 0.02, 0.03])
    assert load_kv_scales_json(_write_json(tmp_path / "n.json", _legacy_doc(3, model_type=None)), 3, "qwen2")


@pytest.mark.parametrize("doc, layers, match", [
    (_legacy_doc(3, dtype="float8_e5m2"), 3, "kv_cache.dtype must be 'float8_e4m3fn', got 'float8_e5m2'"),
    (_legacy_doc(3, model_type="qwen2"), 3, "model_type 'qwen2' does not match the model's 'llama'"),
    (_legacy_doc(2), 3, r"scaling_factor\['0'\]\['2'\] must be a positive number, got None"),
    ({"model_type": None}, 3, "missing object 'kv_cache'"),
    ({"kv_cache": {"dtype": "float8_e4m3fn", "scaling_factor": {"0": {"0": 1.0}, "1": {"0": 1.0}}}}, 1,
     r"exactly 1 TP rank\(s\)"),
    ({"kv_cache": {"dtype": "float8_e4m3fn", "scaling_factor": {"1": {"0": 1.0}}}}, 1, "no TP rank '0'"),
    ({"kv_cache": {"dtype": "float8_e4m3fn", "scaling_factor": {"0": {"0": -2}}}}, 1, "must be a positive number"),
])
def test_legacy_json_errors_name_the_field(tmp_path, doc, layers, match):
    with pytest.raises(ValueError, match=match):
        load_kv_scales_json(_write_json(tmp_path / "kv.json", doc), layers, "llama")


def test_legacy_json_missing_or_malformed_file(tmp_path):
    with pytest.raises(ValueError, match="quantization_param_path: .*missing.json does not exist"):
        load_kv_scales_json(tmp_path / "missing.json", 2, "llama")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not readable JSON"):
        load_kv_scales_json(bad, 2, "llama")


def _description(tmp_path, **extra):
    desc = {"model_quant_type": "W8A8", "version": "1.0.0", "model.layers.0.self_attn.q_proj.weight": "W8A8", **extra}
    (tmp_path / "quant_model_description.json").write_text(json.dumps(desc))
    return tmp_path


@pytest.mark.parametrize("extra", [{"kv_cache_type": "C8"}, {"model.layers.0.self_attn.k_proj.kv_cache_scale": "C8"}])
def test_c8_description_switches_auto_to_int8(tmp_path, extra, caplog):
    model_dir = _description(tmp_path, **extra)
    with caplog.at_level("INFO"):
        assert checkpoint_kv_cache_dtype("auto", model_dir) == "int8"
    assert "C8" in caplog.text and "auto -> int8" in caplog.text
    assert checkpoint_kv_cache_dtype("int8", model_dir) == "int8"
    with pytest.raises(ValueError, match="kv_cache_dtype: 'fp8' does not fit .*C8"):
        checkpoint_kv_cache_dtype("fp8", model_dir)


def test_no_c8_keeps_the_requested_dtype(tmp_path):
    assert checkpoint_kv_cache_dtype("auto", tmp_path) == "auto"                      # float checkpoint
    assert checkpoint_kv_cache_dtype("fp8", _description(tmp_path)) == "fp8"          # W8A8 without C8


def _attention_layers(n=2):
    ops = build_op_set("cpu")
    return [Attention(4, D, H, D ** -0.5, ops) for _ in range(n)]


def test_rules_json_int8_rescaled_and_calculate_pending():
    layers = _attention_layers()
    bind_kv_cache_scales(layers, "int8", False, json_scales=[0.1, 0.2])
    assert [a.kv_scales.k_scale.item() for a in layers] == pytest.approx([0.1 * 448 / 127, 0.2 * 448 / 127])
    assert not any(a.kv_scales_pending for a in layers)
    bind_kv_cache_scales(layers := _attention_layers(), "int8", False)      # int8, nothing given: calculate
    assert all(a.kv_scales_pending for a in layers)


def test_rules_calculate_replaces_loaded_fp8_but_never_c8():
    fp8, c8 = _attention_layers(1)[0], _attention_layers(1)[0]
    fp8.checkpoint_kv_scales.update(k_scale=torch.tensor([0.3]), v_scale=torch.tensor([0.4]))
    c8.checkpoint_kv_scales.update(c8_k_scale=torch.full((H * D,), 0.1), c8_k_offset=torch.zeros(H * D),
                                   c8_v_scale=torch.full((H * D,), 0.1), c8_v_offset=torch.ones(H * D))
    bind_kv_cache_scales([fp8], "fp8", calculate=True)
    bind_kv_cache_scales([c8], "int8", calculate=True)
    assert fp8.kv_scales_pending and not c8.kv_scales_pending
    assert torch.equal(c8.kv_scales.v_offset, torch.ones(H, D))


def test_first_batch_sets_scales_once_and_e5m2_ignores_them():
    attn = _attention_layers(1)[0]
    bind_kv_cache_scales([attn], "fp8", calculate=True)
    k, v = torch.randn(5, H, D), torch.randn(5, H, D)
    cache = tuple(torch.zeros(3, 4, H, D, dtype=torch.float8_e4m3fn) for _ in range(2))
    meta = AttentionMetadata.build([5], [5], [[0, 1]], list(range(5)), 4, 2, torch.device("cpu"))
    attn(torch.randn(5, 4 * D), k.flatten(1), v.flatten(1), cache, meta)
    first = attn.kv_scales.k_scale.clone()
    assert torch.allclose(first, k.abs().amax() / 200)
    attn(torch.randn(5, 4 * D), 10 * k.flatten(1), v.flatten(1), cache, meta)
    assert torch.equal(attn.kv_scales.k_scale, first)                 # not recalculated
    e5m2 = _attention_layers(1)[0]
    e5m2.checkpoint_kv_scales["k_scale"] = torch.tensor([0.5])
    bind_kv_cache_scales([e5m2], "fp8_e5m2", calculate=True)
    assert e5m2.kv_scales.k_scale.item() == 1.0 and not e5m2.kv_scales_pending


def test_load_kv_scale_puts_tensors_on_the_named_layer_and_rejects_unknown_layers():
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList(torch.nn.Module() for _ in range(2))
    for layer, attn in zip(model.layers, _attention_layers()):
        layer.self_attn = torch.nn.Module()
        layer.self_attn.attn = attn
    assert load_kv_scale(model, "layers.1.self_attn.k_proj.output_scale", torch.tensor([0.25], dtype=torch.bfloat16))
    loaded = model.layers[1].self_attn.attn.checkpoint_kv_scales
    assert loaded["k_scale"].dtype == torch.float32 and loaded["k_scale"].item() == 0.25
    assert not model.layers[0].self_attn.attn.checkpoint_kv_scales
    assert model.layers[1].self_attn.attn.layer_name == "layers.1.self_attn"
    assert load_kv_scale(model, "layers.0.self_attn.q_scale", torch.ones(1))         # unused: skipped
    assert not model.layers[0].self_attn.attn.checkpoint_kv_scales
    assert not load_kv_scale(model, "layers.0.self_attn.k_proj.weight", torch.ones(1))
    with pytest.raises(ValueError, match="'layers.5.self_attn.v_scale': no attention layer at 'layers.5.self_attn'"):
        load_kv_scale(model, "layers.5.self_attn.v_scale", torch.ones(1))
