"""CPU reference kernels of the quantized paged KV cache (fp8 e4m3 / e5m2, int8).

Write: q = saturate(x / scale) for fp8 (vLLM's satfinite cast), q = clamp(round(x / scale +
offset), -128, 127) for int8 (msModelSlim C8: cache_int = cache / scale + offset).
Read: only the blocks a step gathers are dequantized, x = (q - offset) * scale, and handed to
the float reference attention, so quantized and float attention share one code path.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import torch

from ascend_llm.ops.attention_metadata import AttentionMetadata, KVCacheScales
from ascend_llm.ops.registry import Kernel, OpRegistry

BACKEND = "cpu"
# cache storage dtypes per --kv-cache-dtype (fp8 is e4m3, as vLLM on CUDA)
QUANTIZED_KV_CACHE_DTYPES = ("fp8", "fp8_e4m3", "fp8_e5m2", "int8")
_INT8_MIN, _INT8_MAX = -128, 127

AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, float], torch.Tensor]


def quantize_kv(x: torch.Tensor, cache_dtype: torch.dtype, scale: torch.Tensor,
                offset: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., num_kv_heads, head_dim] float -> same shape in `cache_dtype` (int8 or float8)."""
    y = x.float() / scale
    if cache_dtype == torch.int8:
        if offset is not None:
            y = y + offset
        return y.round_().clamp_(_INT8_MIN, _INT8_MAX).to(torch.int8)
    fp8_max = torch.finfo(cache_dtype).max            # 448 for e4m3fn, 57344 for e5m2
    return y.clamp_(-fp8_max, fp8_max).to(cache_dtype)


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                  dtype: torch.dtype) -> torch.Tensor:
    """q [..., num_kv_heads, head_dim] int8/float8 -> (q - offset) * scale in `dtype`."""
    x = q.float()
    if offset is not None:
        x = x - offset
    return (x * scale).to(dtype)


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                      kv_scales: KVCacheScales) -> None:
    """Quantize key/value [num_tokens, num_kv_heads, head_dim] into the int8/float8 paged
    caches [num_blocks, block_size, num_kv_heads, head_dim] at flat slots [num_tokens]."""
    _write(key, k_cache, slot_mapping, kv_scales.k_scale, kv_scales.k_offset)
    _write(value, v_cache, slot_mapping, kv_scales.v_scale, kv_scales.v_offset)


def _write(x: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor,
           scale: torch.Tensor, offset: torch.Tensor | None) -> None:
    num_kv_heads, head_dim = cache.shape[-2:]
    q = quantize_kv(x, cache.dtype, scale, offset)
    # index_copy_ has no float8 kernel on CPU: copy the bytes (same element size)
    cache.view(-1, num_kv_heads, head_dim).view(torch.uint8).index_copy_(
        0, slot_mapping, q.view(torch.uint8))


def paged_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float, kv_scales: KVCacheScales,
                    *, attend: AttendFn) -> torch.Tensor:
    """`attend` (the float paged attention) over the dequantized gathered blocks.

    query: [num_tokens, num_heads, head_dim] -> [num_tokens, num_heads, head_dim].
    """
    block_ids = meta.kv_block_ids                    # [num_seqs * num_ctx_blocks]
    k = dequantize_kv(_gather_blocks(k_cache, block_ids), kv_scales.k_scale, kv_scales.k_offset,
                      query.dtype)                   # [num_gathered, block_size, kv_heads, head_dim]
    v = dequantize_kv(_gather_blocks(v_cache, block_ids), kv_scales.v_scale, kv_scales.v_offset,
                      query.dtype)
    dense = dataclasses.replace(meta, kv_block_ids=torch.arange(block_ids.numel(),
                                                                device=block_ids.device))
    return attend(query, k, v, dense, scale)


def _gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    # index_select has no float8 kernel on every backend: select the bytes, view back
    return cache.view(torch.uint8).index_select(0, block_ids).view(cache.dtype)


def supports_quantized_kv(kv_cache_dtype: str = "auto", **_: Any) -> str | None:
    """Kernel trait check: these kernels only run a quantized KV cache."""
    if kv_cache_dtype in QUANTIZED_KV_CACHE_DTYPES:
        return None
    return f"kv_cache_dtype={kv_cache_dtype!r} is not one of {QUANTIZED_KV_CACHE_DTYPES}"


def register(registry: OpRegistry, attend: AttendFn) -> None:
    """Register the quantized-cache kernels; `attend` is the float paged attention reference."""
    registry.register(Kernel("reshape_and_cache", BACKEND, "cpu.kv_quant.reshape_and_cache",
                             reshape_and_cache, supports_quantized_kv, priority=10))
    registry.register(Kernel("paged_attention", BACKEND, "cpu.kv_quant.paged_attention",
                             functools.partial(paged_attention, attend=attend),
                             supports_quantized_kv, priority=10))
