"""--use_kvcache_quant writes msModelSlim C8 KV-cache scales (format reference §1, "C8")."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from calib.config import CalibConfig
from calib.dataset import load_calib_texts
from calib.pipeline import run_calibration
from tests.shared_data import CALIB_PROSE

CALIB_FILE = str(CALIB_PROSE)


@pytest.fixture(scope="module")
def c8_dir(tiny_qwen2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("c8")
    run_calibration(CalibConfig(model_path=str(tiny_qwen2_dir), save_directory=str(out),
                                calib_file=CALIB_FILE, num_samples=3, max_tokens=48, progress=False,
                                use_kvcache_quant=True))
    return out


def test_c8_tensors_have_the_reference_names_shapes_and_types(c8_dir):
    desc = json.loads((c8_dir / "quant_model_description.json").read_text())
    tensors = load_file(str(c8_dir / "quant_model_weights.safetensors"))
    config = json.loads((c8_dir / "config.json").read_text())
    channels = config["num_key_value_heads"] * config["hidden_size"] // config["num_attention_heads"]
    assert desc["kv_cache_type"] == "C8"
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
            assert bool((offset == offset.round()).all())
            assert -128 <= float(offset.min()) <= float(offset.max()) <= 127
    assert desc["model.layers.0.self_attn.q_proj.weight"] == "W8A8"     # linears unaffected


def test_c8_scales_cover_the_post_rope_cache_of_calibration_text(c8_dir, tiny_qwen2_dir):
    """cache_int = round(cache / scale + offset) never saturates on a calibration text, and the
    round trip error is at most half a step per channel."""
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


def test_c8_checkpoint_runs_in_the_runtime_close_to_float(c8_dir, tiny_qwen2_dir):
    """The runtime loads the C8 scales (int8 KV cache) from the description on its own."""
    from ascend_llm import LLM, SamplingParams

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
