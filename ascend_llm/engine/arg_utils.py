"""EngineArgs: every user-facing engine option (vLLM names, FastDeploy aliases on the CLI)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from ascend_llm.config import CacheConfig, DeviceConfig, ModelConfig, ParallelConfig, SchedulerConfig
from ascend_llm.loader import DEFAULT_MODEL


@dataclass
class EngineArgs:
    """Arguments of `LLM(...)` and of the `ascend-llm` commands."""
    model: str = DEFAULT_MODEL
    tokenizer: str | None = None
    served_model_name: str | None = None
    dtype: str = "auto"
    quantization: str | None = None
    kv_cache_dtype: str = "auto"
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

    def model_config(self) -> ModelConfig:
        return ModelConfig(self.model, self.tokenizer, self.dtype, self.max_model_len,
                           self.quantization, self.seed, self.served_model_name)

    def cache_config(self) -> CacheConfig:
        return CacheConfig(self.block_size, self.kv_cache_dtype, self.enable_prefix_caching,
                           self.num_gpu_blocks_override, self.kv_cache_memory_gb,
                           self.gpu_memory_utilization)

    def scheduler_config(self, max_model_len: int) -> SchedulerConfig:
        batched = self.max_num_batched_tokens
        if batched is None:
            batched = 2048 if self.enable_chunked_prefill else max(2048, max_model_len)
        return SchedulerConfig(self.max_num_seqs, batched, max_model_len, self.enable_chunked_prefill)

    def parallel_config(self) -> ParallelConfig:
        config = ParallelConfig(self.tensor_parallel_size, self.distributed_executor_backend)
        if config.tensor_parallel_size != 1:
            raise ValueError(f"tensor_parallel_size: {config.tensor_parallel_size} is not supported "
                             "by this build yet (tensor parallelism is planned); use 1")
        return config

    def device_config(self) -> DeviceConfig:
        return DeviceConfig(self.device, self.enforce_eager)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "EngineArgs":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})

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
        add("--kv-cache-dtype", default=d.kv_cache_dtype)
        add("--tensor-parallel-size", "--tp", "-tp", type=int, default=d.tensor_parallel_size)
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
        add("--distributed-executor-backend", default=d.distributed_executor_backend, choices=["mp", "ray"])
        return parser
