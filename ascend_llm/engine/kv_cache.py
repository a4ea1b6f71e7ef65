"""Sizing and allocation of the paged KV cache."""
from __future__ import annotations

import logging
import mmap
from dataclasses import dataclass
from typing import Any

import torch

from ascend_llm.config import CacheConfig

logger = logging.getLogger(__name__)

# CPU KV budget: 0.3 GiB holds ~7k fp32 tokens of SmolLM2-135M and keeps a serving process
# of that model under 1.5 GiB peak RSS (benchmarks/bench_server_memory.py).
DEFAULT_CPU_KV_CACHE_GB = 0.3
# CPU caches from this size on come from their own anonymous mapping (zero, lazily committed)
_FRESH_PAGES_BYTES = 64 * 2**20
# --kv-cache-dtype -> storage dtype of a quantized cache ("auto" stores the model dtype)
_KV_STORAGE_DTYPES = {
    "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2, "int8": torch.int8,
}


def kv_cache_storage_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype the paged KV cache is allocated in for `--kv-cache-dtype`."""
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype not in _KV_STORAGE_DTYPES:
        raise ValueError(f"kv_cache_dtype: {kv_cache_dtype!r} is not one of "
                         f"{('auto', *_KV_STORAGE_DTYPES)}")
    return _KV_STORAGE_DTYPES[kv_cache_dtype]


@dataclass(frozen=True, slots=True)
class KVCacheSpec:
    """Shape of one layer's cache: [num_blocks, block_size, num_kv_heads, head_dim] for K and for V."""
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @classmethod
    def from_hf_config(cls, hf_config: Any, block_size: int, dtype: torch.dtype,
                       tp_size: int = 1) -> "KVCacheSpec":
        """One rank's cache: its share of the KV heads (one replicated head when fewer than ranks)."""
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
        num_kv_heads = max(1, num_kv_heads // tp_size)
        return cls(hf_config.num_hidden_layers, num_kv_heads, head_dim, block_size, dtype)

    @property
    def bytes_per_block(self) -> int:
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem


def num_kv_blocks(spec: KVCacheSpec, cache_config: CacheConfig, backend: str) -> int:
    """Blocks that fit the budget: explicit count, else the CPU budget or free device memory."""
    if cache_config.num_gpu_blocks is not None:
        return cache_config.num_gpu_blocks
    return int(_budget_bytes(cache_config, backend) // spec.bytes_per_block)


def fit_max_model_len(max_model_len: int, explicit: bool, num_blocks: int, block_size: int) -> int:
    """The context length the cache can serve: one sequence must fit in all the blocks.

    A model default that does not fit is lowered (with a warning); an explicit
    `max_model_len` that does not fit is an error.
    """
    capacity = num_blocks * block_size
    if capacity >= max_model_len:
        return max_model_len
    if explicit or capacity < block_size:
        raise ValueError(
            f"max_model_len={max_model_len} needs {-(-max_model_len // block_size)} KV blocks of "
            f"{block_size} tokens but the cache holds {num_blocks}; raise the KV cache budget "
            f"(kv_cache_memory_gb / gpu_memory_utilization / num_gpu_blocks_override) or lower max_model_len")
    logger.warning("max_model_len lowered from %d to %d to fit the KV cache (%d blocks); raise "
                   "kv_cache_memory_gb for longer contexts", max_model_len, capacity, num_blocks)
    return capacity


def _budget_bytes(cache_config: CacheConfig, backend: str) -> float:
    if cache_config.kv_cache_memory_gb is not None:
        return cache_config.kv_cache_memory_gb * 2**30
    if backend == "cpu":
        return DEFAULT_CPU_KV_CACHE_GB * 2**30
    device_mod = getattr(torch, backend)
    free, total = device_mod.mem_get_info()
    return max(0.0, free - (1 - cache_config.gpu_memory_utilization) * total)


def allocate_kv_caches(spec: KVCacheSpec, num_blocks: int, device: torch.device
                       ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (K, V) views of num_blocks + 1 blocks; the extra last one is the null block
    that block-table padding points at.

    Attention reads whole blocks and masks positions past each sequence's end, so cache
    memory must never hold NaN/inf: it starts zeroed. A large CPU cache is its own anonymous
    mmap, which the OS hands out zero-filled and commits page by page, so untouched blocks
    cost no resident memory (malloc is not enough: in a long-lived process it can return a
    recycled heap chunk holding old tensors' bytes); elsewhere it is zeroed explicitly.
    """
    shape = (2, spec.num_layers, num_blocks + 1, spec.block_size, spec.num_kv_heads, spec.head_dim)
    nbytes = (num_blocks + 1) * spec.bytes_per_block
    logger.info("KV cache: %d blocks x %d tokens in %s (%.1f MiB)", num_blocks, spec.block_size,
                str(spec.dtype).removeprefix("torch."), num_blocks * spec.bytes_per_block / 2**20)
    if device.type == "cpu" and nbytes >= _FRESH_PAGES_BYTES:
        cache = _zero_pages(nbytes).view(spec.dtype).view(shape)
    else:
        cache = torch.zeros(shape, dtype=spec.dtype, device=device)
    return [(cache[0, i], cache[1, i]) for i in range(spec.num_layers)]


def _zero_pages(nbytes: int) -> torch.Tensor:
    """[nbytes] uint8 over a fresh anonymous mapping: zero-filled by the OS, committed lazily;
    the tensor keeps the mapping alive."""
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8)
