"""load_hf_config / load_tokenizer: success on HF directories, clear ValueErrors otherwise."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import LlamaConfig, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ascend_llm.loader import convert_gguf_to_hf, load_hf_config, load_tokenizer
from tests.loader.gguf_factory import CHAT_TEMPLATE, tiny_tokenizer


def _save_tokenizer(directory: Path) -> None:
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer(), eos_token="<|im_end|>",
                                        chat_template=CHAT_TEMPLATE)
    tokenizer.save_pretrained(str(directory))


def test_loads_llama_config(tmp_path: Path) -> None:
    LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2).save_pretrained(str(tmp_path))
    config = load_hf_config(tmp_path)
    assert isinstance(config, LlamaConfig)
    assert (config.hidden_size, config.num_hidden_layers) == (64, 2)


def test_converted_gguf_config_loads(tiny_gguf: Path, tmp_path: Path) -> None:
    out_dir = convert_gguf_to_hf(tiny_gguf, tmp_path / "hf")
    config = load_hf_config(out_dir)
    assert isinstance(config, LlamaConfig)
    assert config.num_key_value_heads == 2 and config.tie_word_embeddings
    assert config.rope_parameters["rope_theta"] == 10000.0


def test_missing_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="has no config.json"):
        load_hf_config(tmp_path)


def test_invalid_json_names_file(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ValueError, match="config.json.*not valid JSON"):
        load_hf_config(tmp_path)


def test_unknown_model_type(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "frobnicator-9000"}))
    with pytest.raises(ValueError, match="frobnicator-9000") as info:
        load_hf_config(tmp_path)
    assert "config.json" in str(info.value)


def test_missing_model_type(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match="model_type"):
        load_hf_config(tmp_path)


def test_load_tokenizer_from_model_dir(tmp_path: Path) -> None:
    _save_tokenizer(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    assert isinstance(tokenizer, PreTrainedTokenizerBase)
    assert tokenizer.decode(tokenizer("the lazy dog")["input_ids"]) == "the lazy dog"
    assert tokenizer.chat_template == CHAT_TEMPLATE


def test_load_tokenizer_from_separate_dir(tmp_path: Path) -> None:
    model_dir, tok_dir = tmp_path / "model", tmp_path / "tok"
    model_dir.mkdir()
    _save_tokenizer(tok_dir)
    assert load_tokenizer(model_dir, tokenizer=str(tok_dir)).eos_token == "<|im_end|>"


def test_tokenizer_dir_without_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tokenizer directory .* has none of"):
        load_tokenizer(tmp_path)


def test_broken_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{broken")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    with pytest.raises(ValueError, match="could not load a tokenizer"):
        load_tokenizer(tmp_path)


def test_missing_tokenizer_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not found locally"):
        load_tokenizer(tmp_path, tokenizer=str(tmp_path / "nope"))
