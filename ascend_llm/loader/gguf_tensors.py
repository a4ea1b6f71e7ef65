"""GGUF llama tensors -> HF ``LlamaForCausalLM`` tensors: names, dequantization, q/k un-permuting."""
from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import gguf
import numpy as np

_TOP_LEVEL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

_PER_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

_LAYER_NAME = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_TOP_NAME = re.compile(r"^([a-z_]+)\.(weight|bias)$")


@dataclass(frozen=True, slots=True)
class TensorPlan:
    """One GGUF tensor and where it goes: HF name, HF shape and how many heads to un-permute by."""
    tensor: gguf.ReaderTensor
    hf_name: str
    hf_shape: tuple[int, ...]
    unpermute_heads: int | None


def hf_tensor_name(gguf_name: str) -> str:
    """Map a llama GGUF tensor name to its HF name; ValueError for names with no HF counterpart."""
    match = _LAYER_NAME.match(gguf_name)
    if match and match.group(2) in _PER_LAYER:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{_PER_LAYER[part]}.{kind}"
    match = _TOP_NAME.match(gguf_name)
    if match and match.group(1) in _TOP_LEVEL:
        return f"{_TOP_LEVEL[match.group(1)]}.{match.group(2)}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no known HF llama equivalent")


def _unpermute_heads(gguf_name: str, num_heads: int, num_kv_heads: int) -> int | None:
    """Heads to un-permute by: llama.cpp reorders q/k rows for its rotary layout."""
    if ".attn_q." in gguf_name:
        return num_heads
    if ".attn_k." in gguf_name:
        return num_kv_heads
    return None


def plan_tensors(reader: gguf.GGUFReader, num_heads: int, num_kv_heads: int) -> list[TensorPlan]:
    """Every GGUF tensor with its HF name and shape, sorted by HF name."""
    plans = [
        TensorPlan(
            tensor=tensor,
            hf_name=hf_tensor_name(tensor.name),
            hf_shape=tuple(int(d) for d in reversed(tensor.shape)),
            unpermute_heads=_unpermute_heads(tensor.name, num_heads, num_kv_heads),
        )
        for tensor in reader.tensors
    ]
    return sorted(plans, key=lambda plan: plan.hf_name)


def unpermute_rotary(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved -> HF half-split rotary layout)."""
    rows = weights.shape[0]
    if rows % (2 * num_heads):
        raise ValueError(f"cannot un-permute a tensor with {rows} rows over {num_heads} heads")
    half = rows // num_heads // 2
    grouped = weights.reshape(num_heads, half, 2, *weights.shape[1:])
    return grouped.swapaxes(1, 2).reshape(weights.shape)


def dequantize_plan(plan: TensorPlan) -> np.ndarray:
    """Dequantize one planned tensor to a contiguous float32 array in HF layout."""
    tensor = plan.tensor
    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as exc:
        raise ValueError(f"GGUF tensor {tensor.name!r} uses quantization {tensor.tensor_type.name}, "
                         "which cannot be dequantized") from exc
    values = np.asarray(values, dtype=np.float32).reshape(plan.hf_shape)
    if plan.unpermute_heads is not None:
        values = unpermute_rotary(values, plan.unpermute_heads)
    return np.ascontiguousarray(values)


def iter_hf_tensors(plans: list[TensorPlan]) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(hf_name, float32 array)`` one tensor at a time, in plan order."""
    for plan in plans:
        yield plan.hf_name, dequantize_plan(plan)
