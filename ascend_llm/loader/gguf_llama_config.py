"""Translating a llama-architecture GGUF header into a transformers ``LlamaConfig`` dict."""
from __future__ import annotations

from typing import Any

import gguf

from ascend_llm.loader.gguf_metadata import gguf_architecture, gguf_tensor_names, gguf_value

SUPPORTED_ARCHITECTURES = ("llama",)


def _clean_float(value: object) -> float:
    """A float32 metadata value as its shortest faithful decimal (9.99999975e-06 -> 1e-05)."""
    return float(f"{float(value):.7g}")


def _tensor_rows(reader: gguf.GGUFReader, name: str) -> int | None:
    """Number of rows (GGUF's last dimension) of tensor ``name``, or None if absent."""
    for tensor in reader.tensors:
        if tensor.name == name:
            return int(tensor.shape[-1])
    return None


def _rope_scaling(reader: gguf.GGUFReader, arch: str, context_length: int) -> dict[str, Any] | None:
    """HF ``rope_scaling`` from the GGUF's ``{arch}.rope.scaling.*`` keys (None when unscaled)."""
    kind = gguf_value(reader, f"{arch}.rope.scaling.type", "none")
    if kind in ("none", None):
        return None
    factor = float(gguf_value(reader, f"{arch}.rope.scaling.factor", 1.0))
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        original = int(gguf_value(reader, f"{arch}.rope.scaling.original_context_length", context_length))
        return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original}
    raise ValueError(f"GGUF rope scaling type {kind!r} is not supported (only linear and yarn)")


def _check_supported(reader: gguf.GGUFReader, arch: str) -> None:
    """Reject GGUF files this converter would turn into a silently wrong model."""
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: {SUPPORTED_ARCHITECTURES}")
    if "rope_freqs.weight" in gguf_tensor_names(reader):
        raise ValueError("GGUF has a 'rope_freqs.weight' tensor (llama3-style rope scaling), "
                         "which this converter does not support yet")
    if gguf_value(reader, f"{arch}.expert_count", 0):
        raise ValueError("GGUF is a mixture-of-experts llama model, which is not supported")


def _head_dims(reader: gguf.GGUFReader, arch: str, hidden: int, heads: int) -> int:
    """Per-head dimension; rejects partial rotary embeddings that LlamaConfig cannot express."""
    head_dim = int(gguf_value(reader, f"{arch}.attention.key_length", hidden // heads))
    rope_dim = int(gguf_value(reader, f"{arch}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"GGUF rope.dimension_count ({rope_dim}) differs from the head dim ({head_dim}); "
                         "partial rotary embeddings are not supported")
    return head_dim


def _token_ids(reader: gguf.GGUFReader) -> dict[str, int]:
    """bos/eos/pad token ids declared by the GGUF tokenizer (only those present)."""
    ids = {}
    for hf_key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                             ("pad_token_id", "padding_token_id")):
        value = gguf_value(reader, f"tokenizer.ggml.{gguf_key}", None)
        if value is not None:
            ids[hf_key] = int(value)
    return ids


def llama_config_from_gguf(reader: gguf.GGUFReader) -> dict[str, Any]:
    """Build the ``config.json`` dict of an HF ``LlamaForCausalLM`` equivalent to the GGUF model."""
    arch = gguf_architecture(reader)
    _check_supported(reader, arch)
    hidden = int(gguf_value(reader, f"{arch}.embedding_length"))
    heads = int(gguf_value(reader, f"{arch}.attention.head_count"))
    context = int(gguf_value(reader, f"{arch}.context_length", 2048))
    rope_theta = _clean_float(gguf_value(reader, f"{arch}.rope.freq_base", 10000.0))
    vocab = _tensor_rows(reader, "token_embd.weight")
    if vocab is None:
        raise ValueError("GGUF has no 'token_embd.weight' tensor")
    tensor_names = gguf_tensor_names(reader)
    rope_scaling = _rope_scaling(reader, arch, context)
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(gguf_value(reader, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(gguf_value(reader, f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(gguf_value(reader, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": _head_dims(reader, arch, hidden, heads),
        "hidden_act": "silu",
        "rms_norm_eps": _clean_float(gguf_value(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta, **(rope_scaling or {})},
        "max_position_embeddings": context,
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": "blk.0.ffn_up.bias" in tensor_names,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
        **_token_ids(reader),
    }
    return config
