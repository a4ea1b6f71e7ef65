"""Bytes a loaded model holds in its weights, split by part and dtype.

What the quantization formats promise about memory: int8 linear weights ~1/4 of fp32, packed int4
~1/8, e4m3 ~1/4, WINT2 ~1/16 plus its scales. Counted over parameters and buffers (each tensor
once, so a tied LM head is the embedding), grouped as linear layers (modules with a
`quant_method`: weights and every scale), embedding, LM head, and the rest (norms).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn as nn

PARTS = ("linear", "embedding", "lm_head", "other")


@dataclass
class WeightBytes:
    """Bytes per part (`PARTS`) and per (part, dtype name)."""
    parts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PARTS, 0))
    by_dtype: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(dict))

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def add(self, part: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        self.parts[part] += nbytes
        dtype = str(tensor.dtype).removeprefix("torch.")
        self.by_dtype[part][dtype] = self.by_dtype[part].get(dtype, 0) + nbytes


def _part(module_name: str, module: nn.Module) -> str:
    if hasattr(module, "quant_method") and module_name != "lm_head":
        return "linear"
    if module_name.endswith("embed_tokens"):
        return "embedding"
    if module_name == "lm_head":
        return "lm_head"
    return "other"


def _storage_key(tensor: torch.Tensor) -> int:
    """Identity of the memory behind `tensor`; an opaque (e.g. oneDNN-packed) tensor is its own."""
    if tensor.is_mkldnn:
        return id(tensor)
    return tensor.untyped_storage().data_ptr()


def weight_bytes(model: nn.Module) -> WeightBytes:
    """Count every parameter and buffer of `model` once (by storage) under its module's part."""
    result = WeightBytes()
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        part = _part(module_name, module)
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        for tensor in tensors:
            key = _storage_key(tensor)
            if key in seen or tensor.numel() == 0:
                continue
            seen.add(key)
            result.add(part, tensor)
    return result
