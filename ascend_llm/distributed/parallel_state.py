"""The tensor-parallel context of one rank: rank, world size, process groups and device.

No module globals: `init_parallel_context` returns a `ParallelContext` that is passed to the
model (and from there to every layer). torch.distributed keeps its default group per process;
`destroy_parallel_context` releases it so a process can build another engine later.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# ascend_llm backend -> torch.distributed backend of the model's collectives
DIST_BACKENDS = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}
DEFAULT_TIMEOUT_S = 120.0
# control messages (the next step) may be hours apart on an idle server: no practical timeout;
# a dead peer still fails them at once (its connections close)
CONTROL_TIMEOUT = timedelta(days=30)
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR")


@dataclass(frozen=True)
class ParallelContext:
    """One rank's view of the tensor-parallel group.

    `group` runs the model's collectives (hccl / nccl / gloo, with the start-up timeout);
    `cpu_group` (gloo, no practical timeout) carries control messages: the broadcast
    SchedulerOutput, which an idle server may not send for hours. Both are None at world size 1.
    """
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = "cpu"
    group: Any = None
    cpu_group: Any = None

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank: {self.rank} is not in [0, world_size={self.world_size})")

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_driver(self) -> bool:
        """Rank 0 schedules, samples and talks to clients."""
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """This rank's device: cpu, or cuda:/npu:<local_rank> (the bare type at world size 1)."""
        if self.backend == "cpu":
            return torch.device("cpu")
        emulated = _emulated_npu("emulated_device") if self.backend == "npu" else None
        if emulated is not None:
            return torch.device(emulated)
        return torch.device(self.backend, self.local_rank) if self.is_distributed \
            else torch.device(self.backend)


def free_port() -> int:
    """A TCP port nothing listens on now (for MASTER_PORT when spawning workers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def torchrun_env() -> dict[str, int | str] | None:
    """{rank, world_size, local_rank, init_method} from torchrun-style env, or None if unset."""
    if not all(name in os.environ for name in TORCHRUN_ENV):
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError as exc:
        raise ValueError(f"RANK / WORLD_SIZE / LOCAL_RANK: must be integers ({exc})") from exc
    if "MASTER_PORT" not in os.environ:
        raise ValueError("MASTER_PORT: must be set along with MASTER_ADDR, RANK and WORLD_SIZE")
    return {"rank": rank, "world_size": world, "local_rank": local, "init_method": "env://"}


def init_parallel_context(rank: int, world_size: int, backend: str, init_method: str,
                          local_rank: int | None = None,
                          timeout_s: float = DEFAULT_TIMEOUT_S,
                          before_rendezvous: Callable[[], None] | None = None) -> ParallelContext:
    """Join the process group (blocks until every rank has joined) and return the context.

    `backend` is the ascend_llm backend (cpu / cuda / npu); world size 1 joins nothing.
    `before_rendezvous` is called once the device is selected, just before blocking (a worker
    tells its driver that it reached the rendezvous).
    """
    local_rank = rank if local_rank is None else local_rank
    if world_size == 1:
        return ParallelContext(0, 1, 0, backend)
    if backend not in DIST_BACKENDS:
        raise ValueError(f"backend: {backend!r} is not one of {sorted(DIST_BACKENDS)}")
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialized in this process: shut the "
                           "other tensor-parallel engine down first")
    _select_device(backend, local_rank)
    if before_rendezvous is not None:
        before_rendezvous()
    timeout = timedelta(seconds=timeout_s)
    dist_backend = (backend == "npu" and _emulated_npu("emulated_dist_backend")) or DIST_BACKENDS[backend]
    dist.init_process_group(dist_backend, init_method=init_method, rank=rank,
                            world_size=world_size, timeout=timeout)
    group = dist.group.WORLD
    cpu_group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    logger.info("rank %d/%d joined the %s group", rank, world_size, dist_backend)
    return ParallelContext(rank, world_size, local_rank, backend, group, cpu_group)


def destroy_parallel_context(context: ParallelContext, barrier: bool = True) -> None:
    """Leave the process group (no-op at world size 1 or when already gone).

    With `barrier` the ranks first wait for one another, so none tears its connections down
    while a peer still uses them; skip it when a peer is known to be dead.
    """
    if not (context.is_distributed and dist.is_initialized()):
        return
    if barrier:
        try:
            dist.barrier(group=context.group)         # bounded by the model group timeout
        except Exception as exc:     # a peer already gone: leave anyway
            logger.warning("rank %d: barrier before leaving the group failed: %s", context.rank, exc)
    dist.destroy_process_group()


def _select_device(backend: str, local_rank: int) -> None:
    if backend == "cuda":
        torch.cuda.set_device(local_rank)
    elif backend == "npu":
        from ascend_llm.platform import import_torch_npu
        if import_torch_npu() is None:
            raise RuntimeError("backend npu: torch_npu is not installed (needed for hccl)")
        torch.npu.set_device(local_rank)


def _emulated_npu(attribute: str) -> str | None:
    """What a stand-in torch_npu (the test emulation, tensors on the CPU) names instead of the
    hardware: `emulated_device` (for npu:<rank>) or `emulated_dist_backend` (for hccl)."""
    from ascend_llm.platform import import_torch_npu
    return getattr(import_torch_npu(), attribute, None)
