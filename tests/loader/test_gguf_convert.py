"""GGUF -> HF conversion on tiny synthetic GGUFs whose exact HF weights are known."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, LlamaForCausalLM

from ascend_llm.loader import convert_gguf_to_hf
from ascend_llm.loader.gguf_tensors import hf_tensor_name, unpermute_rotary
from tests.loader.gguf_factory import CHAT_TEMPLATE, llama_cpp_permute, write_tiny_gguf

_IDS = torch.tensor([[5, 17, 40, 99, 3, 250, 7]])


def _convert(tmp_path: Path, tie: bool, quantize: bool) -> tuple[LlamaForCausalLM, Path]:
    reference = write_tiny_gguf(tmp_path / "m.gguf", tie=tie, quantize=quantize)
    return reference, convert_gguf_to_hf(tmp_path / "m.gguf", tmp_path / "hf")


def test_unpermute_inverts_llama_cpp_permute() -> None:
    weights = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)
    permuted = llama_cpp_permute(weights, 3)
    assert not np.array_equal(permuted, weights)
    np.testing.assert_array_equal(unpermute_rotary(permuted, 3), weights)


def test_tensor_names_map_to_hf() -> None:
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("blk.7.attn_k.weight") == "model.layers.7.self_attn.k_proj.weight"
    assert hf_tensor_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    with pytest.raises(ValueError, match="rope_freqs"):
        hf_tensor_name("rope_freqs.weight")


def test_f32_gguf_converts_exactly(tmp_path: Path) -> None:
    reference, out_dir = _convert(tmp_path, tie=True, quantize=False)
    model = LlamaForCausalLM.from_pretrained(str(out_dir)).eval()
    expected, got = reference.state_dict(), model.state_dict()
    assert sorted(expected) == sorted(got)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(model(_IDS).logits, reference(_IDS).logits)


def test_tied_model_has_no_lm_head_tensor(tmp_path: Path) -> None:
    _, out_dir = _convert(tmp_path, tie=True, quantize=False)
    config = json.loads((out_dir / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    with safe_open(str(out_dir / "model.safetensors"), framework="pt") as handle:
        assert "lm_head.weight" not in handle.keys()
        assert handle.get_tensor("model.embed_tokens.weight").dtype == torch.float32


def test_quantized_untied_gguf_matches_reference(tmp_path: Path) -> None:
    reference, out_dir = _convert(tmp_path, tie=False, quantize=True)
    config = json.loads((out_dir / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    model = LlamaForCausalLM.from_pretrained(str(out_dir)).eval()
    torch.testing.assert_close(model.lm_head.weight, reference.lm_head.weight, rtol=0, atol=5e-3)
    with torch.no_grad():
        ours, theirs = model(_IDS).logits, reference(_IDS).logits
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0.1)


def test_config_json_fields(tmp_path: Path) -> None:
    _, out_dir = _convert(tmp_path, tie=True, quantize=False)
    config = json.loads((out_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]) == (64, 4, 2)
    assert config["rms_norm_eps"] == 1e-6 and config["rope_theta"] == 10000.0
    assert config["torch_dtype"] == "float32" and config["max_position_embeddings"] == 128
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    generation = json.loads((out_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2


def test_tokenizer_files_round_trip(tmp_path: Path) -> None:
    _, out_dir = _convert(tmp_path, tie=True, quantize=False)
    assert json.loads((out_dir / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    tokenizer = AutoTokenizer.from_pretrained(str(out_dir))
    text = "The quick brown fox 12345 jumps <|im_end|>"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>") == tokenizer.eos_token_id == 2
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_garbage_gguf_raises_value_error_naming_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(ValueError, match="broken.gguf"):
        convert_gguf_to_hf(bad, tmp_path / "out")
