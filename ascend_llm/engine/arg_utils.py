"""EngineArgs: every user-facing engine option (vLLM names, FastDeploy aliases on the CLI)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import Any

from ascend_llm.config import (KV_CACHE_DTYPES, CacheConfig, DeviceConfig, ModelConfig, ParallelConfig,
                               SchedulerConfig, SpeculativeConfig, parse_json_object,
                               torchair_graph_enabled)
from ascend_llm.loader import DEFAULT_MODEL


@dataclass
class EngineArgs:
    """Arguments of `LLM(...)` and of the `ascend-llm` commands."""
    model: str = DEFAULT_MODEL
    tokenizer: str | None = None
    served_model_name: str | None = None
    dtype: str = "auto"
    quantization: str | None = None
    quantization_strict: bool = False
    kv_cache_dtype: str = "auto"
    calculate_kv_scales: bool = False
    quantization_param_path: str | None = None
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    enforce_eager: bool = False
    device: str = "auto"
    seed: int = 0
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    kv_cache_memory_gb: float | None = None
    distributed_executor_backend: str = "mp"
    speculative_config: dict[str, Any] | str | None = None
    additional_config: dict[str, Any] | str | None = None

    def model_config(self) -> ModelConfig:
        return ModelConfig(self.model, self.tokenizer, self.dtype, self.max_model_len,
                           self.quantization, self.seed, self.served_model_name,
                           self.quantization_strict)

    def cache_config(self) -> CacheConfig:
        return CacheConfig(self.block_size, self.kv_cache_dtype, self.enable_prefix_caching,
                           self.num_gpu_blocks_override, self.kv_cache_memory_gb,
                           self.gpu_memory_utilization, self.calculate_kv_scales,
                           self.quantization_param_path)

    def scheduler_config(self, max_model_len: int) -> SchedulerConfig:
        batched = self.max_num_batched_tokens
        if batched is None:
            batched = 2048 if self.enable_chunked_prefill else max(2048, max_model_len)
        return SchedulerConfig(self.max_num_seqs, batched, max_model_len, self.enable_chunked_prefill)

    def parallel_config(self) -> ParallelConfig:
        return ParallelConfig(self.tensor_parallel_size, self.distributed_executor_backend)

    def device_config(self) -> DeviceConfig:
        return DeviceConfig(self.device, self.enforce_eager, torchair_graph_enabled(self.additional_config))

    def speculative(self) -> SpeculativeConfig | None:
        return SpeculativeConfig.parse(self.speculative_config)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "EngineArgs":
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        quantization = values.get("quantization")
        if isinstance(quantization, str) and quantization.lstrip().startswith("{"):
            values.update(fastdeploy_quantization(quantization, values.get("kv_cache_dtype", "auto")))
        return cls(**values)

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Engine flags with vLLM names and FastDeploy aliases."""
        d = EngineArgs()
        add = parser.add_argument
        add("--model", default=d.model, help="local model dir, .gguf file or alias (default: %(default)s)")
        add("--tokenizer", default=None, help="tokenizer dir (default: the model's)")
        add("--served-model-name", default=None, help="model name the API reports")
        add("--dtype", default=d.dtype, choices=["auto", "float32", "float16", "bfloat16"])
        add("--quantization", "-q", default=None, help="quantization method (e.g. wint8, w8a8, fp8)")
        add("--quantization-strict", action="store_true",
            help="fail at start-up, naming each layer, if any quantized layer would not run a native "
                 "low-bit kernel on this backend (a reference, or dequantize + float matmul)")
        add("--kv-cache-dtype", default=d.kv_cache_dtype, choices=KV_CACHE_DTYPES,
            help="KV cache storage: auto (model dtype), fp8 (= fp8_e4m3), fp8_e5m2 or int8; "
                 "quantized caches hold twice the tokens of a 16-bit one (default: %(default)s)")
        add("--calculate-kv-scales", action="store_true",
            help="compute fp8/int8 KV scales from the first batch instead of using 1.0 "
                 "(int8 without checkpoint scales always does)")
        add("--quantization-param-path", default=None,
            help="legacy vLLM JSON of per-layer fp8 KV cache scales (kv_cache.scaling_factor)")
        add("--tensor-parallel-size", "--tp", "-tp", type=int, default=d.tensor_parallel_size,
            help="ranks the model is split over (one process each; gloo on cpu, nccl, hccl)")
        add("--max-model-len", type=int, default=None, help="context length (default: the model's)")
        add("--max-num-seqs", type=int, default=d.max_num_seqs)
        add("--max-num-batched-tokens", type=int, default=None)
        add("--block-size", type=int, default=d.block_size)
        add("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
        add("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True)
        add("--enforce-eager", action="store_true")
        add("--device", default=d.device, choices=["auto", "cpu", "cuda", "npu"])
        add("--seed", type=int, default=d.seed)
        add("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization)
        add("--num-gpu-blocks-override", type=int, default=None)
        add("--kv-cache-memory-gb", type=float, default=None,
            help="KV cache size on CPU in GiB (default 0.3)")
        add("--distributed-executor-backend", default=d.distributed_executor_backend, choices=["mp", "ray"],
            help="mp: worker processes on this node; ray: Ray actors (multi-node, needs ray); "
                 "torchrun-style RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT env overrides both")
        add("--speculative-config", default=None,
            help='speculative decoding as JSON, e.g. \'{"method": "ngram", "num_speculative_tokens": 5, '
                 '"prompt_lookup_max": 4}\' (ngram prompt lookup; greedy output is unchanged)')
        add("--additional-config", default=None,
            help='vllm-ascend\'s JSON: \'{"torchair_graph_config": {"enabled": true}}\' runs NPU decode '
                 'steps torch.compile\'d by torchair instead of as ACL graphs (needs torchair)')
        return parser


# FastDeploy kv_cache_quant_type -> --kv-cache-dtype (zero-point and dynamic block-wise variants unsupported)
_FD_KV_CACHE_TYPES = {"int8": "int8", "float8_e4m3fn": "fp8"}


def fastdeploy_quantization(text: str, kv_cache_dtype: str) -> dict[str, str | None]:
    """FastDeploy's JSON `--quantization '{"quantization": ..., "kv_cache_quant_type": "int8"}'`
    -> {"quantization": method or None, "kv_cache_dtype": ...}; mix_quant uses dense_quant_type."""
    config = parse_json_object(text, "quantization")
    method = config.get("quantization")
    if method == "mix_quant":
        method = config.get("dense_quant_type")
    result: dict[str, str | None] = {"quantization": method}
    kv_type = config.get("kv_cache_quant_type")
    if kv_type is not None:
        if kv_type not in _FD_KV_CACHE_TYPES:
            raise ValueError(f"quantization: kv_cache_quant_type {kv_type!r} is not supported; "
                             f"use one of {sorted(_FD_KV_CACHE_TYPES)}")
        wanted = _FD_KV_CACHE_TYPES[kv_type]
        if kv_cache_dtype not in ("auto", wanted):
            raise ValueError(f"quantization: kv_cache_quant_type {kv_type!r} conflicts with "
                             f"--kv-cache-dtype {kv_cache_dtype}")
        result["kv_cache_dtype"] = wanted
    return result
