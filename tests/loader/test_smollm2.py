"""The real default model: bundled SmolLM2-135M-Instruct GGUF -> HF dir -> transformers generates sensibly."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ascend_llm.loader import (load_hf_config, load_tokenizer, resolve_model_path, iter_safetensors_weights)
from ascend_llm.loader import gguf_convert

pytestmark = pytest.mark.slow


def test_alias_resolves_to_converted_dir(smollm2_dir: Path, smollm2_cache: Path) -> None:
    assert smollm2_dir.is_relative_to(smollm2_cache)
    names = {p.name for p in smollm2_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors",
            "tokenizer.json", "tokenizer_config.json"} <= names


@pytest.mark.parametrize("spelling", ["SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"])
def test_cached_resolve_is_fast_and_does_not_reconvert(smollm2_dir: Path, smollm2_cache: Path, spelling: str,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    def must_not_convert(*args: object) -> None:
        raise AssertionError("cached model was converted again")

    monkeypatch.setattr(gguf_convert, "convert_gguf_to_hf", must_not_convert)
    mtime = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="ascend_llm.loader"):
        again = resolve_model_path(spelling, cache_dir=str(smollm2_cache))
    assert time.perf_counter() - start < 2.0
    assert again == smollm2_dir
    assert (again / "model.safetensors").stat().st_mtime_ns == mtime
    assert "reusing cached conversion" in caplog.text


def test_config_matches_smollm2(smollm2_dir: Path) -> None:
    config = load_hf_config(smollm2_dir)
    assert config.architectures == ["LlamaForCausalLM"]
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (576, 30, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (9, 3, 49152)
    assert config.tie_word_embeddings and config.max_position_embeddings == 8192
    assert config.rope_parameters["rope_theta"] == 100000.0 and config.rms_norm_eps == 1e-5
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)


def test_weights_are_float32_hf_names(smollm2_dir: Path) -> None:
    with safe_open(str(smollm2_dir / "model.safetensors"), framework="pt") as handle:
        names = set(handle.keys())
    assert len(names) == 2 + 30 * 9 and "lm_head.weight" not in names
    assert "model.layers.29.self_attn.q_proj.weight" in names
    name, first = next(iter_safetensors_weights(smollm2_dir))
    assert name == "model.embed_tokens.weight" and first.shape == (49152, 576) and first.dtype == torch.float32


def test_tokenizer_round_trip_and_chat_template(smollm2_dir: Path) -> None:
    tokenizer = load_tokenizer(smollm2_dir)
    text = "Hello world! The year 2024 -- naïve café 🙂\n    indented"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    assert tokenizer.eos_token == "<|im_end|>"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_greedy_answer_mentions_paris(smollm2_dir: Path, smollm2_model) -> None:  # noqa: ANN001
    tokenizer = load_tokenizer(smollm2_dir)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.no_grad():
        output = smollm2_model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
