"""Executors and workers of tensor parallelism: start the ranks, broadcast every step, watch them.

- `worker`: a rank's loop (build the shard, run each broadcast SchedulerOutput); `WorkerSpec`.
- `base`: `DriverExecutor`, the driver (rank 0, the engine process), and `ExternalLaunchExecutor`
  for a torchrun-style env (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT) that launches the
  ranks from outside; a dead rank is a `WorkerDiedError` (`errors`) naming it, and the server's
  /health turns 503.
- `multiproc`: `mp` (the default) starts the other ranks on this node.
- `start_method`: fork or spawn for `mp` workers (fork by default where safe, so notebooks,
  `python -` and unguarded scripts work; VLLM_WORKER_MULTIPROC_METHOD overrides).
- `worker_processes`: start the `mp` workers and wait for their reports while watching them,
  so one that dies during start-up is reported at once.
- `ray`: ranks as Ray actors for multi-node (optional; clear error without Ray).
- `launch`: choose the executor; `validate_tp_config` refuses sizes the model cannot split.

The process groups and collectives the ranks join are `ascend_llm.distributed` (below this package).

    LLM("model", tensor_parallel_size=2)          # or: ascend-llm serve --model M --tp 2
"""
