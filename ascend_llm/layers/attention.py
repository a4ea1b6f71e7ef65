"""Paged attention layer: write this step's KV to the cache, attend over the context."""
from __future__ import annotations

import torch
import torch.nn as nn

from ascend_llm.ops.attention_metadata import AttentionMetadata
from ascend_llm.ops.registry import OpSet


class Attention(nn.Module):
    """q [T, H*D], k/v [T, Hkv*D] -> [T, H*D] using the layer's paged KV cache."""

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float,
                 ops: OpSet) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.num_kv_heads = num_heads, head_dim, num_kv_heads
        self.scale = scale
        self._reshape_and_cache = ops.get("reshape_and_cache")
        self._paged_attention = ops.get("paged_attention")

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = kv_cache
        self._reshape_and_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        out = self._paged_attention(q, k_cache, v_cache, meta, self.scale)
        return out.reshape(num_tokens, self.num_heads * self.head_dim)
