"""Run model shards in spawned gloo ranks and collect the driver's logits.

`spawn_logits(world_size, jobs)` starts `world_size` processes (torch.multiprocessing spawn),
each joins a gloo group on a free port, builds every job's model shard through `ModelRunner`
and runs a prefill of two sequences plus one decode step; rank 0 returns the full logits
{job name: [num_tokens, vocab] float32}. World size 1 runs in this process, without any group.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.multiprocessing as mp

from ascend_llm.config import CacheConfig, ModelConfig
from ascend_llm.distributed.parallel_state import (ParallelContext, destroy_parallel_context, free_port,
                                                   init_parallel_context)
from ascend_llm.engine.model_runner import ModelRunner
from ascend_llm.loader import load_hf_config
from ascend_llm.models.forward_batch import ForwardBatch
from ascend_llm.ops import AttentionMetadata

BLOCK_SIZE = 16
PROMPTS = ([5, 17, 33, 101, 250, 7, 64, 3, 199, 42, 11], [300, 12, 9, 77, 150])


@dataclass(frozen=True)
class Job:
    """One model to shard: a checkpoint dir and the --quantization value (None: auto / float)."""
    name: str
    model_dir: str
    quantization: str | None = None


def _batch(runner: ModelRunner, seqs: list[list[int]], starts: list[int]) -> ForwardBatch:
    """Sequence i occupies blocks [4 i, 4 i + 4); its tokens seqs[i][starts[i]:] are new."""
    ids, positions, slots, query_lens, context_lens, tables = [], [], [], [], [], []
    for i, (seq, start) in enumerate(zip(seqs, starts)):
        table = list(range(4 * i, 4 * i + 4))
        ids += seq[start:]
        positions += range(start, len(seq))
        slots += [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(start, len(seq))]
        query_lens.append(len(seq) - start)
        context_lens.append(len(seq))
        tables.append(table)
    meta = AttentionMetadata.build(query_lens, context_lens, tables, slots, BLOCK_SIZE,
                                   runner.null_block, runner.device)
    as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return ForwardBatch(as_tensor(ids), as_tensor(positions), meta, runner.kv_caches,
                        as_tensor(range(len(ids))))


def forward_batch(runner: ModelRunner, seqs: list[list[int]], starts: list[int]) -> ForwardBatch:
    """The batch `_batch` builds, for tests that drive a model themselves (`runner` needs only
    `kv_caches`, `null_block` and `device`)."""
    return _batch(runner, seqs, starts)


@torch.inference_mode()
def job_logits(job: Job, parallel: ParallelContext) -> torch.Tensor:
    """Prefill logits of both prompts, then one decode step each: [num_tokens + 2, vocab]."""
    model_dir = Path(job.model_dir)
    runner = ModelRunner(ModelConfig(job.model_dir, quantization=job.quantization, dtype="float32"),
                         CacheConfig(block_size=BLOCK_SIZE, num_gpu_blocks=16),
                         load_hf_config(model_dir), model_dir, "cpu", set(), parallel)
    seqs = [list(p) for p in PROMPTS]
    prefill = runner.model.compute_logits(runner.model(_batch(runner, seqs, [0, 0])))
    starts = [len(s) for s in seqs]
    seqs = [s + [int(prefill[sum(map(len, PROMPTS[:i + 1])) - 1].argmax())] for i, s in enumerate(seqs)]
    decode = runner.model.compute_logits(runner.model(_batch(runner, seqs, starts)))
    return torch.cat([prefill, decode])


def _rank_main(rank: int, world_size: int, port: int, jobs: list[Job], out_path: str) -> None:
    torch.set_num_threads(1)
    parallel = init_parallel_context(rank, world_size, "cpu", f"tcp://127.0.0.1:{port}", timeout_s=120)
    try:
        results = {}
        for job in jobs:
            try:
                results[job.name] = job_logits(job, parallel)
            except ValueError as exc:           # the same on every rank: no collective is pending
                results[job.name] = f"ValueError: {exc}"
        if rank == 0:
            torch.save(results, out_path)
    finally:
        destroy_parallel_context(parallel)


def spawn_logits(world_size: int, jobs: list[Job]) -> dict[str, torch.Tensor | str]:
    """{job name: driver logits, or "ValueError: ..." when building the shard failed}."""
    if world_size == 1:
        return {job.name: job_logits(job, ParallelContext()) for job in jobs}
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "logits.pt")
        mp.spawn(_rank_main, args=(world_size, free_port(), jobs, out_path), nprocs=world_size,
                 join=True)
        return torch.load(out_path)


def _idle_rank_main(rank: int, world_size: int, port: int, idle_s: float, out_path: str) -> None:
    """Rank 0 waits `idle_s` (longer than the group timeout) before broadcasting a step."""
    import time
    from ascend_llm.executor.worker import broadcast_step
    parallel = init_parallel_context(rank, world_size, "cpu", f"tcp://127.0.0.1:{port}", timeout_s=2)
    try:
        if rank == 0:
            time.sleep(idle_s)
        got = broadcast_step(parallel, {"step": 1} if rank == 0 else None)
        assert got == {"step": 1}
        if rank == 1:
            Path(out_path).write_text("received")
    finally:
        destroy_parallel_context(parallel)


def spawn_idle_driver(idle_s: float) -> str:
    """What worker rank 1 received after its driver stayed idle for `idle_s` seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "received.txt")
        mp.spawn(_idle_rank_main, args=(2, free_port(), idle_s, out_path), nprocs=2, join=True)
        return Path(out_path).read_text()
