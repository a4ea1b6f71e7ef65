"""Engine configuration dataclasses. Bad values raise ValueError naming the field."""
from __future__ import annotations

from dataclasses import dataclass

_DTYPES = ("auto", "float32", "float16", "bfloat16")
_DEVICES = ("auto", "cpu", "cuda", "npu")
# vLLM's CacheDType names (fp8 = fp8_e4m3) plus int8 (msModelSlim C8 / FastDeploy cache_int8)
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2", "int8")


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


@dataclass(slots=True)
class ModelConfig:
    """What to load and how: path or alias, dtype, context length, quantization."""
    model: str
    tokenizer: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    quantization: str | None = None
    seed: int = 0
    served_model_name: str | None = None

    def __post_init__(self) -> None:
        _require(isinstance(self.model, str) and self.model.strip() != "",
                 "model: must be a non-empty path or alias")
        _require(self.dtype in _DTYPES, f"dtype: {self.dtype!r} is not one of {_DTYPES}")
        _require(self.max_model_len is None or self.max_model_len > 0,
                 f"max_model_len: must be positive, got {self.max_model_len}")


@dataclass(slots=True)
class CacheConfig:
    """Paged KV cache: block size, dtype, prefix caching and how much memory it takes."""
    block_size: int = 16
    kv_cache_dtype: str = "auto"
    enable_prefix_caching: bool = True
    num_gpu_blocks: int | None = None      # explicit block count overrides the memory budget
    kv_cache_memory_gb: float | None = None  # CPU budget (vLLM's VLLM_CPU_KVCACHE_SPACE)
    gpu_memory_utilization: float = 0.9
    calculate_kv_scales: bool = False        # KV scales from the first batch (vLLM)
    quantization_param_path: str | None = None   # legacy vLLM JSON of per-layer fp8 KV scales

    def __post_init__(self) -> None:
        _require(self.block_size > 0 and self.block_size % 8 == 0 or self.block_size in (1, 2, 4),
                 f"block_size: must be a power of two >= 1 (8, 16, 32 ...), got {self.block_size}")
        _require(self.kv_cache_dtype in KV_CACHE_DTYPES,
                 f"kv_cache_dtype: {self.kv_cache_dtype!r} is not one of {KV_CACHE_DTYPES}")
        _require(self.num_gpu_blocks is None or self.num_gpu_blocks > 0,
                 f"num_gpu_blocks: must be positive, got {self.num_gpu_blocks}")
        _require(self.kv_cache_memory_gb is None or self.kv_cache_memory_gb > 0,
                 f"kv_cache_memory_gb: must be positive, got {self.kv_cache_memory_gb}")
        _require(0.0 < self.gpu_memory_utilization <= 1.0,
                 f"gpu_memory_utilization: must be in (0, 1], got {self.gpu_memory_utilization}")


@dataclass(slots=True)
class SchedulerConfig:
    """Continuous batching limits (vLLM names)."""
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        _require(self.max_num_seqs > 0, f"max_num_seqs: must be positive, got {self.max_num_seqs}")
        _require(self.max_model_len > 0, f"max_model_len: must be positive, got {self.max_model_len}")
        _require(self.max_num_batched_tokens > 0,
                 f"max_num_batched_tokens: must be positive, got {self.max_num_batched_tokens}")
        _require(self.enable_chunked_prefill or self.max_num_batched_tokens >= self.max_model_len,
                 f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_model_len "
                 f"({self.max_model_len}) when chunked prefill is disabled")


DISTRIBUTED_EXECUTOR_BACKENDS = ("mp", "ray")


@dataclass(slots=True)
class ParallelConfig:
    """Tensor parallelism: ranks and how their processes are started (mp on one node, ray)."""
    tensor_parallel_size: int = 1
    distributed_executor_backend: str = "mp"

    def __post_init__(self) -> None:
        _require(isinstance(self.tensor_parallel_size, int) and self.tensor_parallel_size >= 1,
                 f"tensor_parallel_size: must be an integer >= 1, got {self.tensor_parallel_size!r}")
        _require(self.distributed_executor_backend in DISTRIBUTED_EXECUTOR_BACKENDS,
                 f"distributed_executor_backend: {self.distributed_executor_backend!r} is not one of "
                 f"{DISTRIBUTED_EXECUTOR_BACKENDS}")


@dataclass(slots=True)
class DeviceConfig:
    """Which backend runs the model: auto picks npu, then cuda, then cpu."""
    device: str = "auto"
    enforce_eager: bool = False

    def __post_init__(self) -> None:
        _require(self.device in _DEVICES, f"device: {self.device!r} is not one of {_DEVICES}")
