"""Tensor-parallel state: process groups (hccl / nccl / gloo) and collective helpers.

- `parallel_state`: `ParallelContext` (rank, world size, groups, device), passed into the model;
  no module globals. The collectives themselves are registry ops (`ops/collectives.py`).
- `communication`: the max-reduce online quantization needs while processing weights.

The worker processes and executors that start the ranks are `ascend_llm.executor` (above the
model layers; this package imports none of them).

    LLM("model", tensor_parallel_size=2)          # or: ascend-llm serve --model M --tp 2
"""
from ascend_llm.distributed.parallel_state import ParallelContext

__all__ = ["ParallelContext"]
