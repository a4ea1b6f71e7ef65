"""Fused float32 CPU kernels for the small ops of a step (csrc/cpu_decode.cpp), preferred over
the reference kernels of ops/cpu.py wherever the C++ library builds (ops/cpu_extension.py).

At batch-1 decode SmolLM2's 30 layers spend as long in norms, rotary, the KV-cache write,
attention and SiLU-and-mul as in streaming the weights: the reference runs 3-10 torch ops per
op (each a dispatch and a temporary), and its attention gathers every sequence's whole context
into a padded copy before SDPA. Each kernel here is one call, and decode attention reads K/V in
place through the block table. Same math as the reference (tests/ops/test_cpu_fused.py compares
them on random inputs, odd shapes included).

Each kernel hands what it does not cover to the reference: other dtypes, queries of more than
one token per sequence (prefill, chunked prefill, speculative verification), and tracing (ONNX
export) or torch.compile, which cannot see into the C++ ops. `ASCEND_LLM_DISABLE_KERNELS=
cpu.fused_rms_norm,...` steps single kernels aside.
"""
from __future__ import annotations

from typing import Any

import torch

from ascend_llm.ops import cpu
from ascend_llm.ops.attention_metadata import AttentionMetadata
from ascend_llm.ops.cpu_extension import extension_unavailable
from ascend_llm.ops.registry import Kernel, OpRegistry

PRIORITY = 10     # above the reference kernels (0)


def _eager(*tensors: torch.Tensor) -> bool:
    """True when every tensor is a CPU float32 one and the call is not traced or compiled."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [num_tokens, hidden] -> same shape."""
    if x.dim() == 2 and _eager(x, weight):
        return torch.ops.ascend_llm_cpu.rms_norm(x, weight, eps)
    return cpu.rms_norm(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual); x, residual: [num_tokens, hidden]."""
    if x.dim() == 2 and x.shape == residual.shape and _eager(x, residual, weight):
        return torch.ops.ascend_llm_cpu.add_rms_norm(x, residual, weight, eps)
    return cpu.add_rms_norm(x, residual, weight, eps)


def rope(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox rotary embedding; query [T, H, D], key [T, Hkv, D], cos/sin [T, 1, D] (sign folded)."""
    if (query.dim() == 3 and key.dim() == 3 and query.stride(-1) == 1 and key.stride(-1) == 1
            and cos.numel() == sin.numel() == query.shape[0] * query.shape[-1]
            and _eager(query, key, cos, sin)):
        return torch.ops.ascend_llm_cpu.rope(query, key, cos, sin)
    return cpu.rope(query, key, cos, sin)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, 2 * d] (gate | up) -> [num_tokens, d]."""
    if x.dim() == 2 and _eager(x):
        return torch.ops.ascend_llm_cpu.silu_and_mul(x)
    return cpu.silu_and_mul(x)


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write key/value [num_tokens, num_kv_heads, head_dim] into the paged caches at flat slots."""
    if (key.dim() == 3 and value.dim() == 3 and key.stride(-1) == 1 and value.stride(-1) == 1
            and k_cache.is_contiguous() and v_cache.is_contiguous()
            and _eager(key, value, k_cache, v_cache)):
        torch.ops.ascend_llm_cpu.reshape_and_cache(key, value, k_cache, v_cache, slot_mapping)
        return
    cpu.reshape_and_cache(key, value, k_cache, v_cache, slot_mapping)


def paged_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """query: [num_tokens, num_heads, head_dim] -> same shape; one token per sequence runs in C++
    straight from the block table, longer queries through the reference."""
    if (meta.max_query_len == 1 and query.dim() == 3 and k_cache.is_contiguous()
            and v_cache.is_contiguous() and _eager(query, k_cache, v_cache)):
        return torch.ops.ascend_llm_cpu.decode_attention(query, k_cache, v_cache, meta.block_tables,
                                                        meta.context_lens, scale)
    return cpu.paged_attention(query, k_cache, v_cache, meta, scale)


def _supports(**traits: Any) -> str | None:
    return extension_unavailable()


def _supports_float_kv(kv_cache_dtype: str = "auto", **traits: Any) -> str | None:
    return cpu._supports_float_kv(kv_cache_dtype) or extension_unavailable()


def register(registry: OpRegistry) -> None:
    """Register the fused kernels above the references (selected when the library loads)."""
    for fn in (rms_norm, add_rms_norm, rope, silu_and_mul):
        registry.register(Kernel(fn.__name__, "cpu", f"cpu.fused_{fn.__name__}", fn, _supports,
                                 priority=PRIORITY))
    for fn in (reshape_and_cache, paged_attention):
        registry.register(Kernel(fn.__name__, "cpu", f"cpu.fused_{fn.__name__}", fn, _supports_float_kv,
                                 priority=PRIORITY))
