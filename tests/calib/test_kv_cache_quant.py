"""--use_kvcache_quant writes msModelSlim C8 KV-cache scales: symmetric by default (offset 0, the
form vllm-ascend's C8 decode attention handles), asymmetric on request; the runtime loads both."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from calib.config import CalibConfig
from calib.dataset import load_calib_texts
from calib.pipeline import run_calibration
from calib.quantize import kv_cache_tensors
from tests.shared_data import CALIB_PROSE

CALIB_FILE = str(CALIB_PROSE)


def c8_config(model_dir, out, asymmetric: bool = False) -> CalibConfig:
    return CalibConfig(model_path=str(model_dir), save_directory=str(out), calib_file=CALIB_FILE,
                       num_samples=3, max_tokens=48, progress=False, use_kvcache_quant=True,
                       kv_asymmetric=asymmetric)


@pytest.fixture(scope="module")
def c8_dir(tiny_qwen2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("c8")
    run_calibration(c8_config(tiny_qwen2_dir, out))
    return out


@pytest.fixture(scope="module")
def c8_asym_dir(tiny_qwen2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("c8_asym")
    run_calibration(c8_config(tiny_qwen2_dir, out, asymmetric=True))
    return out


def test_kv_cache_tensors_symmetric_by_default():
    c_min, c_max = torch.tensor([-2.0, -0.5, 0.25]), torch.tensor([1.0, 3.0, 0.5])
    sym = kv_cache_tensors(c_min, c_max)
    assert torch.allclose(sym["kv_cache_scale"], torch.tensor([2.0, 3.0, 0.5]) / 127)
    assert torch.equal(sym["kv_cache_offset"], torch.zeros(3))
    asym = kv_cache_tensors(c_min, c_max, asymmetric=True)
    assert torch.allclose(asym["kv_cache_scale"], torch.tensor([3.0, 3.5, 0.5]) / 255)
    assert bool((asym["kv_cache_offset"] != 0).any())


def test_c8_tensors_have_the_reference_names_shapes_and_types(c8_dir):
    desc = json.loads((c8_dir / "quant_model_description.json").read_text())
    tensors = load_file(str(c8_dir / "quant_model_weights.safetensors"))
    config = json.loads((c8_dir / "config.json").read_text())
    channels = config["num_key_value_heads"] * config["hidden_size"] // config["num_attention_heads"]
    assert desc["kv_cache_type"] == desc["kv_quant_type"] == "C8"    # both, as msModelSlim writes
    names = [n for n in desc if n.endswith(("kv_cache_scale", "kv_cache_offset"))]
    assert len(names) == 4 * config["num_hidden_layers"]
    for layer in range(config["num_hidden_layers"]):
        for proj in ("k_proj", "v_proj"):
            for part in ("kv_cache_scale", "kv_cache_offset"):
                name = f"model.layers.{layer}.self_attn.{proj}.{part}"
                assert desc[name] == "C8"
                assert tensors[name].dtype == torch.float32 and tuple(tensors[name].shape) == (channels,)
            scale = tensors[f"model.layers.{layer}.self_attn.{proj}.kv_cache_scale"]
            offset = tensors[f"model.layers.{layer}.self_attn.{proj}.kv_cache_offset"]
            assert bool((scale > 0).all())
            assert bool((offset == 0).all())                                # symmetric default
    assert desc["model.layers.0.self_attn.q_proj.weight"] == "W8A8"     # linears unaffected


@pytest.mark.parametrize("fixture", ["c8_dir", "c8_asym_dir"])
def test_c8_scales_cover_the_post_rope_cache_of_calibration_text(fixture, request, tiny_qwen2_dir):
    """cache_int = round(cache / scale + offset) never saturates on a calibration text, and the
    round trip error is at most half a step per channel."""
    c8_dir = request.getfixturevalue(fixture)
    tensors = load_file(str(c8_dir / "quant_model_weights.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32).eval()
    text = load_calib_texts(CALIB_FILE, 1)[0]
    ids = AutoTokenizer.from_pretrained(tiny_qwen2_dir)(text, truncation=True, max_length=48)["input_ids"]
    with torch.no_grad():
        cache = model(torch.tensor([ids]), use_cache=True).past_key_values
    for layer, entry in enumerate(cache.layers):
        for proj, states in (("k_proj", entry.keys), ("v_proj", entry.values)):
            x = states[0].transpose(0, 1).reshape(len(ids), -1)                 # [seq, kv * hd]
            scale = tensors[f"model.layers.{layer}.self_attn.{proj}.kv_cache_scale"]
            offset = tensors[f"model.layers.{layer}.self_attn.{proj}.kv_cache_offset"]
            q = torch.round(x / scale + offset)
            assert float(q.min()) >= -128.5 and float(q.max()) <= 127.5      # saturation-free
            error = ((q.clamp(-128, 127) - offset) * scale - x).abs()
            assert bool((error <= scale * 0.5 + 1e-5).all())


@pytest.mark.parametrize("fixture", ["c8_dir", "c8_asym_dir"])
def test_c8_checkpoint_runs_in_the_runtime_close_to_float(fixture, request, tiny_qwen2_dir):
    """The runtime loads the C8 scales (int8 KV cache), symmetric or not, from the description."""
    from ascend_llm import LLM, SamplingParams

    c8_dir = request.getfixturevalue(fixture)
    text = load_calib_texts(CALIB_FILE, 21)[20]
    ids = AutoTokenizer.from_pretrained(tiny_qwen2_dir)(text)["input_ids"][:60]
    llm = LLM(str(c8_dir), max_model_len=128, enforce_eager=True)
    assert llm.llm_engine.model_runner.kv_caches[0][0].dtype == torch.int8
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    entries = llm.generate(prompt_token_ids=[ids], sampling_params=params, use_tqdm=False)[0].prompt_logprobs
    quant = torch.tensor([entries[i + 1][ids[i + 1]].logprob for i in range(len(ids) - 1)])
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], dim=-1)
    ref = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    # W8A8 + C8 on the tiny Llama measured mean |d logprob| 0.019 (0.016 without C8)
    assert float((quant - ref).abs().mean()) < 0.08


def test_asymmetric_c8_has_offsets_and_warns_about_vllm_ascend(c8_asym_dir, tiny_qwen2_dir, tmp_path, caplog):
    tensors = load_file(str(c8_asym_dir / "quant_model_weights.safetensors"))
    offsets = [t for n, t in tensors.items() if n.endswith("kv_cache_offset")]
    assert any(bool((t != 0).any()) for t in offsets)
    assert all(bool((t == t.round()).all()) and -128 <= float(t.min()) <= float(t.max()) <= 127
               for t in offsets)
    with caplog.at_level(logging.WARNING, logger="calib.export"):
        run_calibration(c8_config(tiny_qwen2_dir, tmp_path / "out", asymmetric=True))
    assert any("vllm-ascend" in r.getMessage() and "offset" in r.getMessage() for r in caplog.records)
