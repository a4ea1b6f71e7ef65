"""Pick and start the executor for a ParallelConfig: none (TP=1), mp, ray or a torchrun launch."""
from __future__ import annotations

import logging
from typing import Any

from ascend_llm.config import ParallelConfig
from ascend_llm.distributed.parallel_state import (destroy_parallel_context, init_parallel_context,
                                                   torchrun_env)
from ascend_llm.executor.base import DriverExecutor, ExternalLaunchExecutor
from ascend_llm.executor.multiproc import MultiprocExecutor
from ascend_llm.executor.worker import WorkerSpec, run_worker_loop

logger = logging.getLogger(__name__)


def validate_tp_config(hf_config: Any, tp_size: int, model_cls: type | None = None) -> None:
    """ValueError naming the model field that `tp_size` ranks cannot split evenly (or the
    architecture, when `model_cls` has no tensor-parallel layers). MoE configs also need their
    expert and shared-expert intermediate sizes to split (`_moe_fields`)."""
    if tp_size == 1:
        return
    if model_cls is not None and not getattr(model_cls, "supports_tensor_parallel", False):
        raise ValueError(f"tensor_parallel_size: {model_cls.__name__} does not support tensor "
                         f"parallelism yet; use tensor_parallel_size 1")
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    kv_ok = lambda t: kv_heads % t == 0 if kv_heads >= t else t % kv_heads == 0  # noqa: E731
    splits = [("intermediate_size", hf_config.intermediate_size), *_moe_fields(hf_config)]
    checks = [("num_attention_heads", heads, heads % tp_size == 0),
              ("num_key_value_heads", kv_heads, kv_ok(tp_size)),
              *((field, value, value % tp_size == 0) for field, value in splits)]
    for field, value, ok in checks:
        if not ok:
            divisible = [t for t in range(1, 9) if heads % t == 0 and kv_ok(t)
                         and all(v % t == 0 for _, v in splits)]
            raise ValueError(f"tensor_parallel_size: {tp_size} does not divide the model's {field} "
                             f"({value}); sizes that do: {divisible}")


def _moe_fields(hf_config: Any) -> list[tuple[str, int]]:
    """(field, size) of the MoE dims tensor parallelism splits: each routed expert's
    moe_intermediate_size, Qwen2-MoE's shared_expert_intermediate_size, and ERNIE's shared
    experts (one MLP of moe_intermediate_size * moe_num_shared_experts; divisible when the
    former is). Empty for dense models."""
    fields = []
    for name in ("moe_intermediate_size", "shared_expert_intermediate_size"):
        value = getattr(hf_config, name, None)
        if isinstance(value, int) and value > 0:
            fields.append((name, value))
    return fields


def create_executor(parallel_config: ParallelConfig, spec: WorkerSpec) -> DriverExecutor | None:
    """The driver's executor, or None for a single process (TP=1 without a launcher).

    Under a torchrun-style launch a rank other than 0 runs the worker loop here and then exits
    the process (SystemExit(0)) once the driver stops.
    """
    tp_size = parallel_config.tensor_parallel_size
    env = torchrun_env()
    if env is not None and int(env["world_size"]) > 1:
        return _external_launch(env, tp_size, spec)
    if tp_size == 1:
        return None
    if parallel_config.distributed_executor_backend == "ray":
        from ascend_llm.executor.ray import RayExecutor
        return RayExecutor(spec, tp_size)
    return MultiprocExecutor(spec, tp_size)


def _external_launch(env: dict[str, Any], tp_size: int, spec: WorkerSpec) -> DriverExecutor:
    if env["world_size"] != tp_size:
        raise ValueError(f"tensor_parallel_size: {tp_size} differs from WORLD_SIZE={env['world_size']} "
                         f"of the torchrun-style launch")
    parallel = init_parallel_context(int(env["rank"]), tp_size, spec.backend, str(env["init_method"]),
                                     int(env["local_rank"]), spec.timeout_s)
    runner = spec.build_runner(parallel)
    if parallel.is_driver:
        return ExternalLaunchExecutor(parallel, runner)
    steps = run_worker_loop(parallel, runner)
    logger.info("rank %d: driver stopped after %d steps; exiting", parallel.rank, steps)
    destroy_parallel_context(parallel)
    raise SystemExit(0)
