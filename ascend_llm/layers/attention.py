"""Paged attention layer: write this step's KV to the cache, attend over the context."""
from __future__ import annotations

import torch
import torch.nn as nn

from ascend_llm.layers.kv_scales import calculate_kv_scales
from ascend_llm.ops.attention_metadata import AttentionMetadata, KVCacheScales
from ascend_llm.ops.registry import OpSet


class Attention(nn.Module):
    """q [T, H*D], k/v [T, Hkv*D] -> [T, H*D] using the layer's paged KV cache.

    A quantized cache (`bind_kv_cache`) quantizes on write and dequantizes on read with the
    layer's `kv_scales`; with `calculate` pending they come from the first batch's K/V.
    """

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float,
                 ops: OpSet) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.num_kv_heads = num_heads, head_dim, num_kv_heads
        self.scale = scale
        self.ops = ops
        self.kv_cache_dtype = "auto"
        self.kv_scales: KVCacheScales | None = None
        self.checkpoint_kv_scales: dict[str, torch.Tensor] = {}   # KV-scale tensors as loaded
        self.layer_name: str | None = None
        self._calculate_kv_scales = False
        self._reshape_and_cache = ops.get("reshape_and_cache")
        self._paged_attention = ops.get("paged_attention")

    def bind_kv_cache(self, kv_cache_dtype: str, scales: KVCacheScales | None,
                      calculate: bool = False, device: torch.device | None = None) -> None:
        """Select the cache kernels for `kv_cache_dtype` and set the scales (once, after loading)."""
        if kv_cache_dtype != "auto" and scales is None:
            raise ValueError(f"{self.layer_name or 'attention'}: a {kv_cache_dtype} KV cache needs scales")
        self.kv_cache_dtype = kv_cache_dtype
        self.kv_scales = None if scales is None else _float32_on(scales, device)
        self._calculate_kv_scales = calculate
        self._reshape_and_cache = self.ops.get("reshape_and_cache", kv_cache_dtype=kv_cache_dtype)
        self._paged_attention = self.ops.get("paged_attention", kv_cache_dtype=kv_cache_dtype)

    @property
    def kv_scales_pending(self) -> bool:
        """True until the first batch has set the calculated KV scales."""
        return self._calculate_kv_scales

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = kv_cache
        if self.kv_scales is None:
            self._reshape_and_cache(k, v, k_cache, v_cache, meta.slot_mapping)
            out = self._paged_attention(q, k_cache, v_cache, meta, self.scale)
        else:
            if self._calculate_kv_scales:     # once, from the first batch (vLLM calculate_kv_scales)
                self.kv_scales = calculate_kv_scales(k, v, self.kv_cache_dtype)
                self._calculate_kv_scales = False
            self._reshape_and_cache(k, v, k_cache, v_cache, meta.slot_mapping, self.kv_scales)
            out = self._paged_attention(q, k_cache, v_cache, meta, self.scale, self.kv_scales)
        return out.reshape(num_tokens, self.num_heads * self.head_dim)


def _float32_on(scales: KVCacheScales, device: torch.device | None) -> KVCacheScales:
    def move(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device=device, dtype=torch.float32)
    return KVCacheScales(k_scale=move(scales.k_scale), v_scale=move(scales.v_scale),
                         k_offset=move(scales.k_offset), v_offset=move(scales.v_offset))
