"""NPU paged attention: write K/V with _npu_reshape_and_cache, attend with
npu_fused_infer_attention_score over the paged cache (TND layout, one call for any mix of
prefill, chunked-prefill and decode sequences), as vllm-ascend's v1 attention does."""
from __future__ import annotations

from typing import Any

import torch

from ascend_llm.ops.attention_metadata import AttentionMetadata, KVCacheScales
from ascend_llm.ops.npu_attention_tasks import active_capture
from ascend_llm.ops.npu_runtime import torch_npu

CAUSAL_MASK_SIZE = 2048       # sparse_mode 3 takes a fixed 2048 x 2048 upper-triangular mask


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """key/value [num_tokens, num_kv_heads, head_dim] -> caches [num_blocks, block_size,
    num_kv_heads, head_dim] at flat slots (the op takes int32 slot indices)."""
    torch_npu()._npu_reshape_and_cache(key=key, value=value, key_cache=k_cache, value_cache=v_cache,
                                       slot_indices=slot_mapping.to(torch.int32))


def reshape_and_cache_int8(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                           kv_scales: KVCacheScales) -> None:
    """msModelSlim C8: q = clamp(round(x / scale + offset)) with npu_quantize (div_mode), then the
    int8 rows go into the int8 caches. Scales [1] or [num_kv_heads, head_dim] (and offsets) are
    flattened to the [num_kv_heads * head_dim] last axis npu_quantize broadcasts over; with an
    offset both take that full length (zero_points must match the scales' shape)."""
    npu = torch_npu()
    num_tokens, hidden = key.shape[0], key.shape[1] * key.shape[2]
    quantized = []
    for x, scale, offset in ((key, kv_scales.k_scale, kv_scales.k_offset),
                             (value, kv_scales.v_scale, kv_scales.v_offset)):
        scales = scale.float().reshape(-1)                                       # [1] or [Hkv * D]
        zero_point = None
        if offset is not None:
            scales = scales.expand(hidden).contiguous()                          # [Hkv * D]
            zero_point = offset.reshape(-1).expand(hidden).to(torch.int8).contiguous()
        q = npu.npu_quantize(x.reshape(num_tokens, hidden), scales, zero_point,
                             torch.qint8, -1, True)                              # [T, Hkv * D] int8
        quantized.append(q.view_as(x))
    reshape_and_cache(quantized[0], quantized[1], k_cache, v_cache, slot_mapping)


def _antiquant(scale: torch.Tensor, offset: torch.Tensor | None,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """FIA antiquant form of x = (q - offset) * scale: (q + antiquant_offset) * antiquant_scale,
    flattened to [1] or [num_kv_heads * head_dim] in the query dtype."""
    flat_offset = None if offset is None else (-offset).reshape(-1).to(dtype)
    return scale.reshape(-1).to(dtype), flat_offset


class PagedAttention:
    """`paged_attention` on the NPU; holds the causal mask (built once per device)."""

    def __init__(self) -> None:
        self._masks: dict[torch.device, torch.Tensor] = {}

    def causal_mask(self, device: torch.device) -> torch.Tensor:
        """[2048, 2048] bool, True above the diagonal (masked)."""
        mask = self._masks.get(device)
        if mask is None:
            mask = torch.ones(CAUSAL_MASK_SIZE, CAUSAL_MASK_SIZE, dtype=torch.bool, device=device).triu_(1)
            self._masks[device] = mask
        return mask

    def __call__(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 meta: AttentionMetadata, scale: float, kv_scales: KVCacheScales | None = None) -> torch.Tensor:
        """query [num_tokens, num_heads, head_dim] -> same shape; this step's KV already cached.

        sparse_mode 3 (rightDownCausal): a sequence's i-th new token sees the first
        context_len - query_len + i + 1 cached tokens, the layout AttentionMetadata describes.
        An int8 (C8) cache is dequantized inside the op (key/value_antiquant_scale/offset,
        per-channel mode 0).
        """
        num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
        antiquant = {}
        if kv_scales is not None:
            k_scale, k_offset = _antiquant(kv_scales.k_scale, kv_scales.k_offset, query.dtype)
            v_scale, v_offset = _antiquant(kv_scales.v_scale, kv_scales.v_offset, query.dtype)
            antiquant = dict(key_antiquant_scale=k_scale, key_antiquant_offset=k_offset,
                             value_antiquant_scale=v_scale, value_antiquant_offset=v_offset,
                             key_antiquant_mode=0, value_antiquant_mode=0)
        query = query.contiguous()
        key = k_cache.view(num_blocks, block_size, num_kv_heads * head_dim)
        value = v_cache.view(num_blocks, block_size, num_kv_heads * head_dim)
        kwargs = dict(atten_mask=self.causal_mask(query.device), block_table=meta.block_tables.to(torch.int32),
                      num_heads=query.shape[1], num_key_value_heads=num_kv_heads, scale=scale,
                      input_layout="TND", sparse_mode=3, block_size=block_size, **antiquant)
        capture = active_capture()
        if capture is not None:   # decode ACL graph capture: host lengths updated before each replay
            return capture.attention(query, key, value, kwargs)
        out, _ = torch_npu().npu_fused_infer_attention_score(
            query, key, value, actual_seq_lengths=meta.query_start_loc[1:].tolist(),   # cumulative (TND)
            actual_seq_lengths_kv=meta.context_lens.tolist(), **kwargs)
        return out


def supports_float_kv(kv_cache_dtype: str = "auto", **_: Any) -> str | None:
    """The unquantized cache."""
    return None if kv_cache_dtype == "auto" else f"kv_cache_dtype={kv_cache_dtype!r} is quantized"


def supports_int8_kv(kv_cache_dtype: str = "auto", **_: Any) -> str | None:
    """The int8 (msModelSlim C8) cache; Atlas A2 has no fp8 KV path."""
    return None if kv_cache_dtype == "int8" else f"kv_cache_dtype={kv_cache_dtype!r} (NPU quantized KV: int8 only)"


