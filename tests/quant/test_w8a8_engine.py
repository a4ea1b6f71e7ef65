"""msModelSlim W8A8 checkpoints through the whole engine: auto-detected, norm/linear biases,
quality against the float model."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ascend_llm import LLM, SamplingParams
from ascend_llm.eval.perplexity import perplexity
from ascend_llm.layers.layernorm import RMSNorm
from ascend_llm.ops import build_op_set
from tests.quant.w8a8_writer import write_w8a8_checkpoint


@pytest.fixture(scope="module")
def w8a8_dir(tiny_llama_dir, tmp_path_factory):
    return write_w8a8_checkpoint(tiny_llama_dir, tmp_path_factory.mktemp("w8a8"),
                                 layer_types={"mlp.down_proj": "W8A8_DYNAMIC", "layers.1.self_attn.o_proj": "FLOAT"})


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_description_is_auto_detected_and_scores_close_to_float(w8a8_dir, tiny_llama_dir):
    quant = LLM(str(w8a8_dir), max_model_len=128)
    assert quant.llm_engine.model_runner.model.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.int8
    text = tokens(120, 5)
    ppl_quant = perplexity(quant, text, window=60).perplexity
    ppl_float = perplexity(LLM(str(tiny_llama_dir), max_model_len=128), text, window=60).perplexity
    # naive min-max static W8A8 of a random tiny model: measured ~1% apart on 2026-11-23
    assert ppl_quant == pytest.approx(ppl_float, rel=0.05)
    assert ppl_quant != ppl_float
    out = quant.generate(prompt_token_ids=[text[:10]], sampling_params=SamplingParams(temperature=0, max_tokens=5),
                         use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 5


def test_explicit_quantization_name_must_match_checkpoint(w8a8_dir, tiny_llama_dir):
    LLM(str(w8a8_dir), quantization="ascend", max_model_len=64)
    with pytest.raises(ValueError, match="quant_model_description"):
        LLM(str(tiny_llama_dir), quantization="ascend", max_model_len=64)


def test_anti_outlier_norm_bias_is_loaded_and_applied(w8a8_dir, tmp_path):
    # add the norm bias an anti-outlier shift (m2) writes; the runtime must load and use it
    shifted = tmp_path / "shifted"
    shifted.mkdir()
    for f in w8a8_dir.iterdir():
        (shifted / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(shifted / "quant_model_weights.safetensors"))
    bias = torch.randn(64) * 0.1
    weights["model.layers.0.input_layernorm.bias"] = bias
    save_file(weights, str(shifted / "quant_model_weights.safetensors"))
    desc = json.loads((shifted / "quant_model_description.json").read_text())
    desc["model.layers.0.input_layernorm.bias"] = "FLOAT"
    (shifted / "quant_model_description.json").write_text(json.dumps(desc))
    llm = LLM(str(shifted), max_model_len=64)
    layers = llm.llm_engine.model_runner.model.model.layers
    assert torch.equal(layers[0].input_layernorm.bias, bias)
    assert layers[0].post_attention_layernorm.bias is None and layers[1].input_layernorm.bias is None


def test_rms_norm_bias_semantics():
    norm = RMSNorm(8, 1e-6, build_op_set("cpu"), bias=True)
    norm.bias.data = torch.randn(8)
    x, residual = torch.randn(3, 8), torch.randn(3, 8)
    plain = RMSNorm(8, 1e-6, build_op_set("cpu"))
    assert torch.allclose(norm(x), plain(x) + norm.bias)
    normed, new_residual = norm(x, residual)
    assert torch.equal(new_residual, x + residual)          # the bias stays out of the residual stream
    assert torch.allclose(normed, plain(x + residual) + norm.bias)
