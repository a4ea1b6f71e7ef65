"""Engine configuration dataclasses. Bad values raise ValueError naming the field."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, fields
from typing import Any

logger = logging.getLogger(__name__)

_DTYPES = ("auto", "float32", "float16", "bfloat16")
_DEVICES = ("auto", "cpu", "cuda", "npu")
# vLLM's CacheDType names (fp8 = fp8_e4m3) plus int8 (msModelSlim C8 / FastDeploy cache_int8)
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2", "int8")


def parse_json_object(text: str, field: str) -> dict[str, Any]:
    """A CLI value holding a JSON object; ValueError naming `field` if it is not one."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{field}: not valid JSON ({exc}): {text!r}") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{field}: expected a JSON object, got {text!r}")
    return value


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
    quantization_strict: bool = False      # refuse quantized layers off their native kernels

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
    """Which backend runs the model: auto picks npu, then cuda, then cpu. torchair_graph: decode
    steps run torch.compile'd by torchair instead of replaying ACL graphs (npu only)."""
    device: str = "auto"
    enforce_eager: bool = False
    torchair_graph: bool = False

    def __post_init__(self) -> None:
        _require(self.device in _DEVICES, f"device: {self.device!r} is not one of {_DEVICES}")


def torchair_graph_enabled(additional_config: dict[str, Any] | str | None) -> bool:
    """vllm-ascend's `additional_config` (dict, or JSON on the CLI): whether
    torchair_graph_config.enabled is set. Keys we do not act on (vllm-ascend has many) are named
    in a warning, not rejected, so existing launch scripts keep working; wrong types are errors."""
    if additional_config is None:
        return False
    config = (parse_json_object(additional_config, "additional_config")
              if isinstance(additional_config, str) else additional_config)
    _require(isinstance(config, dict), f"additional_config: expected a JSON object, got {config!r}")
    graph = config.get("torchair_graph_config", {})
    _require(isinstance(graph, dict), f"additional_config.torchair_graph_config: expected a JSON object, "
                                      f"got {graph!r}")
    enabled = graph.get("enabled", False)
    _require(isinstance(enabled, bool), f"additional_config.torchair_graph_config.enabled: expected true "
                                        f"or false, got {enabled!r}")
    ignored = [k for k in config if k != "torchair_graph_config"]
    ignored += [f"torchair_graph_config.{k}" for k in graph if k != "enabled"]
    if ignored:
        logger.warning("additional_config: ignoring %s (only torchair_graph_config.enabled is used)", ignored)
    return enabled


SPECULATIVE_METHODS = ("ngram",)


@dataclass(slots=True)
class SpeculativeConfig:
    """Speculative decoding (vLLM's `--speculative-config`): draft tokens proposed each decode
    step and verified together in one forward. `ngram` (prompt lookup) drafts the tokens that
    followed the most recent earlier occurrence of the sequence's last n tokens, n from
    prompt_lookup_max down to prompt_lookup_min. Above `disable_by_batch_size` running
    sequences no drafts are proposed (a large batch is compute-bound, so verifying rejected
    drafts costs more than it saves)."""
    method: str = "ngram"
    num_speculative_tokens: int = 5
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    disable_by_batch_size: int | None = None

    def __post_init__(self) -> None:
        _require(self.method in SPECULATIVE_METHODS,
                 f"speculative_config.method: {self.method!r} is not one of {SPECULATIVE_METHODS}")
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            value = getattr(self, name)
            _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                     f"speculative_config.{name}: must be an integer >= 1, got {value!r}")
        _require(self.prompt_lookup_min <= self.prompt_lookup_max,
                 f"speculative_config: prompt_lookup_min ({self.prompt_lookup_min}) must not exceed "
                 f"prompt_lookup_max ({self.prompt_lookup_max})")
        _require(self.disable_by_batch_size is None
                 or (isinstance(self.disable_by_batch_size, int) and self.disable_by_batch_size >= 1),
                 f"speculative_config.disable_by_batch_size: must be an integer >= 1, "
                 f"got {self.disable_by_batch_size!r}")

    @classmethod
    def parse(cls, value: "SpeculativeConfig | dict[str, Any] | str | None") -> "SpeculativeConfig | None":
        """From a dict or a JSON object string (the CLI form); None stays None."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            value = parse_json_object(value, "speculative_config")
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config: expected a JSON object, got {value!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        _require(not unknown, f"speculative_config: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**value)
