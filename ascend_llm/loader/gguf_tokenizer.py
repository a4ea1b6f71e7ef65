"""Rebuilding an HF fast tokenizer (tokenizer.json + tokenizer_config.json) from GGUF metadata.

Byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``) with a known pre-tokenizer are
built here directly with the ``tokenizers`` library; anything else falls back to transformers'
own GGUF tokenizer support.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import gguf
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ascend_llm.loader.gguf_metadata import gguf_value

logger = logging.getLogger(__name__)

_CONTROL, _USER_DEFINED = 3, 4
# llama.cpp pre-tokenizer types that split every digit before the GPT-2 regex.
_DIGIT_SPLIT_PRE = frozenset({"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"})
_GPT2_PRE = frozenset({"gpt2", "default", "mpt", "olmo", "jais"})
_SPECIAL_ROLES = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                  "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}


def _pre_tokenizer(pre_type: str) -> pre_tokenizers.PreTokenizer:
    """The ``tokenizers`` pre-tokenizer equivalent of llama.cpp's ``tokenizer.ggml.pre`` type."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre_type in _DIGIT_SPLIT_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


def _added_tokens(tokens: list[str], token_types: list[int]) -> tuple[list[AddedToken], list[AddedToken]]:
    """(special, plain) added tokens: CONTROL tokens are special, USER_DEFINED ones are not."""
    special = [AddedToken(t, special=True, normalized=False)
               for t, kind in zip(tokens, token_types) if kind == _CONTROL]
    plain = [AddedToken(t, special=False, normalized=False)
             for t, kind in zip(tokens, token_types) if kind == _USER_DEFINED]
    return special, plain


def _byte_level_bpe(reader: gguf.GGUFReader) -> Tokenizer:
    """A byte-level BPE ``tokenizers.Tokenizer`` from the GGUF vocab, merges and token types."""
    tokens = list(gguf_value(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in gguf_value(reader, "tokenizer.ggml.merges")]
    token_types = list(gguf_value(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    vocab = {token: index for index, token in reversed(list(enumerate(tokens)))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = _pre_tokenizer(gguf_value(reader, "tokenizer.ggml.pre", "default"))
    tokenizer.decoder = decoders.ByteLevel()
    special, plain = _added_tokens(tokens, token_types)
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(plain)
    return tokenizer


def _add_bos_post_processor(tokenizer: Tokenizer, bos: str, bos_id: int) -> None:
    """Make the tokenizer prepend BOS, as the GGUF's ``add_bos_token`` asks."""
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])


def _special_tokens(reader: gguf.GGUFReader, tokens: list[str]) -> dict[str, str]:
    """HF special-token kwargs (bos/eos/unk/pad strings) from the GGUF token ids."""
    found = {}
    for role, key in _SPECIAL_ROLES.items():
        token_id = gguf_value(reader, f"tokenizer.ggml.{key}", None)
        if token_id is not None and 0 <= int(token_id) < len(tokens):
            found[role] = tokens[int(token_id)]
    return found


def _native_tokenizer(reader: gguf.GGUFReader) -> PreTrainedTokenizerFast:
    """Build the HF fast tokenizer for a byte-level BPE GGUF vocabulary."""
    backend = _byte_level_bpe(reader)
    tokens = list(gguf_value(reader, "tokenizer.ggml.tokens"))
    specials = _special_tokens(reader, tokens)
    if gguf_value(reader, "tokenizer.ggml.add_bos_token", False) and "bos_token" in specials:
        _add_bos_post_processor(backend, specials["bos_token"], tokens.index(specials["bos_token"]))
    return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **specials)


def _fallback_tokenizer(gguf_path: Path) -> PreTrainedTokenizerBase:
    """Let transformers build the tokenizer from the GGUF (vocabularies not handled natively)."""
    try:
        return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as exc:  # library boundary
        raise ValueError(f"could not build a tokenizer from GGUF {str(gguf_path)!r}: {exc}") from exc


def build_gguf_tokenizer(reader: gguf.GGUFReader, gguf_path: Path) -> PreTrainedTokenizerBase:
    """The HF tokenizer described by the GGUF metadata, with its chat template attached."""
    model = gguf_value(reader, "tokenizer.ggml.model", None)
    pre_type = gguf_value(reader, "tokenizer.ggml.pre", "default")
    if model == "gpt2" and (pre_type in _DIGIT_SPLIT_PRE or pre_type in _GPT2_PRE):
        tokenizer = _native_tokenizer(reader)
    else:
        logger.info("GGUF tokenizer %s/%s: using transformers' GGUF tokenizer support", model, pre_type)
        tokenizer = _fallback_tokenizer(gguf_path)
    template = gguf_value(reader, "tokenizer.chat_template", None)
    if template:
        tokenizer.chat_template = template
    return tokenizer


def save_gguf_tokenizer(reader: gguf.GGUFReader, gguf_path: Path, out_dir: Path,
                        model_max_length: int | None = None) -> None:
    """Write tokenizer.json and tokenizer_config.json (chat template included) into ``out_dir``."""
    tokenizer = build_gguf_tokenizer(reader, gguf_path)
    if model_max_length:
        tokenizer.model_max_length = model_max_length
    tokenizer.save_pretrained(str(out_dir), save_jinja_files=False)
    _patch_tokenizer_config(out_dir / "tokenizer_config.json", tokenizer.chat_template)


def _patch_tokenizer_config(path: Path, chat_template: str | None) -> None:
    """Use the portable class name and make sure the chat template lives in tokenizer_config.json."""
    config: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if chat_template:
        config["chat_template"] = chat_template
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
