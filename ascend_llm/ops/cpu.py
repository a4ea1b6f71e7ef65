"""CPU reference kernels for every op. Plain torch, fp32 math; every other backend
is tested against these."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ascend_llm.ops import cpu_bf16 as bf16
from ascend_llm.ops import cpu_gemv as gemv
from ascend_llm.ops import cpu_hadamard as hadamard
from ascend_llm.ops import cpu_onednn as onednn
from ascend_llm.ops import cpu_int8 as int8_kernels
from ascend_llm.ops import cpu_kv_quant as kv_quant_kernels
from ascend_llm.ops import cpu_quant as quant_kernels
from ascend_llm.ops.attention_metadata import AttentionMetadata
from ascend_llm.ops.registry import Kernel, OpRegistry

BACKEND = "cpu"
_FUSED_RMS_NORM_MAX_ROWS = 64   # above this, rms_norm uses three plain ops (faster on CPU)


def linear(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x: [num_tokens, in] -> [num_tokens, out] with layer.weight [out, in]."""
    return F.linear(x, layer.weight, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [num_tokens, hidden] -> same shape; normalised in fp32, cast back, then scaled (HF order)."""
    shape = (x.shape[-1],)
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        if x.shape[0] <= _FUSED_RMS_NORM_MAX_ROWS:
            return F.rms_norm(x, shape, weight, eps)       # fused kernel, same math
        # torch's CPU rms_norm runs ~4x slower than these three ops on prefill-sized inputs
        # (2048 x 576: 4.0 vs 0.9 ms, measured); same order of operations as HF's LlamaRMSNorm
        mean_square = torch.mul(x, x).mean(-1, keepdim=True)             # [T, 1]
        return torch.mul(x, mean_square.add_(eps).rsqrt_()).mul_(weight)
    return F.rms_norm(x.float(), shape, None, eps).to(x.dtype) * weight


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual)."""
    residual = x + residual
    return rms_norm(residual, weight, eps), residual


def _rotate_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [num_tokens, num_heads, head_dim]; cos/sin: [num_tokens, 1, head_dim]
    # x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x2, x1) = roll(x) with the sign in sin
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


def rope(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary embedding (HF Llama / Qwen2 "rotate_half" layout), computed in fp32.

    query: [num_tokens, num_heads, head_dim]; key: [num_tokens, num_kv_heads, head_dim];
    cos: [num_tokens, 1, head_dim] = (cos | cos); sin: [num_tokens, 1, head_dim] = (-sin | sin),
    the sign of rotate_half folded in (see RotaryEmbedding.forward).
    """
    if query.dtype == torch.float32:
        return _rotate_neox(query, cos, sin), _rotate_neox(key, cos, sin)
    q = _rotate_neox(query.float(), cos, sin).to(query.dtype)
    k = _rotate_neox(key.float(), cos, sin).to(key.dtype)
    return q, k


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, 2 * d] (gate | up) -> [num_tokens, d]."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]).mul_(x[..., d:])


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write key/value [num_tokens, num_kv_heads, head_dim] into the paged caches
    [num_blocks, block_size, num_kv_heads, head_dim] at flat slots [num_tokens]."""
    num_kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def paged_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its whole cached context.

    query: [num_tokens, num_heads, head_dim] -> [num_tokens, num_heads, head_dim].
    The KV of this step must already be in the cache (reshape_and_cache first).
    """
    num_heads = query.shape[1]
    num_kv_heads = k_cache.shape[-2]
    k = _gather_context(k_cache, meta)   # [num_seqs, num_kv_heads, max_context_len, head_dim]
    v = _gather_context(v_cache, meta)
    q = _pad_queries(query, meta)        # [num_seqs, num_heads, max_query_len, head_dim]
    out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=meta.attn_mask,
                                         scale=scale, enable_gqa=num_heads != num_kv_heads)
    return _unpad_queries(out, meta)


def _gather_context(cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    # whole blocks are copied (contiguous chunks), then trimmed to the longest context
    _, block_size, num_kv_heads, head_dim = cache.shape
    blocks = cache.index_select(0, meta.kv_block_ids)
    ctx = blocks.view(meta.num_seqs, -1, num_kv_heads, head_dim)[:, :meta.max_context_len]
    return ctx.transpose(1, 2)


def _pad_queries(query: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    if meta.max_query_len == 1:   # decode only: one query per sequence, already dense
        return query.unsqueeze(2)
    padded = torch.cat([query, query.new_zeros(1, *query.shape[1:])])[meta.query_pad_index]
    return padded.transpose(1, 2)


def _unpad_queries(out: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    if meta.max_query_len == 1:
        return out.squeeze(2)
    # [num_seqs, num_heads, max_query_len, head_dim] -> [num_tokens, num_heads, head_dim]
    flat = out.transpose(1, 2).reshape(-1, *out.shape[1:2], out.shape[-1])
    return flat.index_select(0, meta.query_unpad_index)


def _supports_float_kv(kv_cache_dtype: str = "auto", **_: object) -> str | None:
    # a quantized cache needs the scales: cpu_kv_quant's kernels
    return None if kv_cache_dtype == "auto" else f"kv_cache_dtype={kv_cache_dtype!r} is quantized"


def register(registry: OpRegistry) -> None:
    """Register the CPU reference kernel of every op."""
    for fn in (linear, rms_norm, add_rms_norm, rope, silu_and_mul):
        registry.register(Kernel(fn.__name__, BACKEND, f"cpu.{fn.__name__}", fn))
    for fn in (reshape_and_cache, paged_attention):
        registry.register(Kernel(fn.__name__, BACKEND, f"cpu.{fn.__name__}", fn, _supports_float_kv))
    gemv.register(registry)
    onednn.register(registry)
    bf16.register(registry)
    quant_kernels.register(registry)
    int8_kernels.register(registry)
    kv_quant_kernels.register(registry, attend=paged_attention)
    hadamard.register(registry)
