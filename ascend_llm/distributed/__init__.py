"""Tensor parallelism: process groups (hccl / nccl / gloo), worker processes, executors.

- `parallel_state`: `ParallelContext` (rank, world size, groups, device), passed into the model;
  no module globals. The collectives themselves are registry ops (`ops/collectives.py`).
- `worker`: a rank's loop (build the shard, run each broadcast SchedulerOutput).
- `executor`: the driver (rank 0, the engine process): `mp` starts the other ranks on this node,
  a torchrun-style env (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT) launches them from
  outside; a dead rank is a `WorkerDiedError` (`errors`) naming it, and the server's /health turns 503.
- `start_method`: fork or spawn for `mp` workers (fork by default where safe, so notebooks,
  `python -` and unguarded scripts work; VLLM_WORKER_MULTIPROC_METHOD overrides).
- `worker_processes`: start the `mp` workers and wait for their reports while watching them,
  so one that dies during start-up is reported at once.
- `ray_executor`: ranks as Ray actors for multi-node (optional; clear error without Ray).
- `launch`: choose the executor; `validate_tp_config` refuses sizes the model cannot split.

    LLM("model", tensor_parallel_size=2)          # or: ascend-llm serve --model M --tp 2
"""
from ascend_llm.distributed.parallel_state import ParallelContext

__all__ = ["ParallelContext"]
