"""Decode-step graph capture per batch-size bucket (ACL graphs via torch.npu.NPUGraph on Ascend;
torch.cuda.CUDAGraph plugs into the same runner).

A decode step `fn(inputs) -> out` is captured once per bucket size b on static input buffers
whose first dimension is b; a batch of n <= b rows is copied into the buffers, the rows n..b-1
are filled with each input's pad value (e.g. a slot that writes into the null KV block), the
graph is replayed and the first n output rows are returned. Batches above the largest bucket
run eagerly.

What a captured step may use: device tensors only. Host values read during capture (Python ints,
`.tolist()`, shapes that depend on the batch contents) are frozen into the graph. A kernel that
takes host arguments which change every step (npu_fused_infer_attention_score's
actual_seq_lengths_kv) is captured in an ACL task group and re-issued with the new arguments
before each replay (`before_replay`), as vllm-ascend does: `ascend_llm.ops.npu_attention_tasks`.
ModelRunner runs pure decode steps through this runner on the npu backend
(`ascend_llm.graph.model_graphs`); that wiring is verified against the emulated torch_npu only
(tests/ops/npu_emulation.py), not on Ascend hardware.
"""
from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from contextlib import nullcontext
from typing import Any, Callable, ContextManager

import torch

logger = logging.getLogger(__name__)

Output = torch.Tensor | tuple[torch.Tensor, ...]
StepFn = Callable[[dict[str, torch.Tensor]], Output]


@dataclass(frozen=True, slots=True)
class GraphAPI:
    """A device's graph primitives: a graph factory, its capture context, a synchronize.

    replays_by_call: nothing is captured; a "replay" calls the step function again on the
    bucket's static buffers (a torch.compile'd step: compiled once per bucket shape).
    """
    name: str
    new_graph: Callable[[], Any]
    capture: Callable[[Any], ContextManager[Any]]
    synchronize: Callable[[], None]
    replays_by_call: bool = False


def npu_graph_api() -> GraphAPI:
    """ACL graph capture (torch.npu.NPUGraph / torch.npu.graph, registered by torch_npu)."""
    npu = getattr(torch, "npu", None)
    if npu is None or not hasattr(npu, "NPUGraph"):
        raise ValueError("graph capture: torch.npu.NPUGraph is unavailable (torch_npu not imported)")
    return GraphAPI("npu", npu.NPUGraph, npu.graph, npu.synchronize)


def torchair_graph_api() -> GraphAPI:
    """torchair graph mode (vllm-ascend's TorchAirGraph): the decode step is torch.compile'd with
    torchair's backend (`ascend_llm.graph.compile`) and called per step on static bucket shapes."""
    npu = getattr(torch, "npu", None)
    if npu is None:
        raise ValueError("torchair graph mode: torch.npu is unavailable (torch_npu not imported)")
    return GraphAPI("torchair", lambda: None, lambda graph: nullcontext(), npu.synchronize, replays_by_call=True)


def cuda_graph_api() -> GraphAPI:
    """CUDA graph capture (torch.cuda.CUDAGraph / torch.cuda.graph)."""
    if not torch.cuda.is_available():
        raise ValueError("graph capture: CUDA is not available")
    return GraphAPI("cuda", torch.cuda.CUDAGraph, torch.cuda.graph, torch.cuda.synchronize)


@dataclass(slots=True)
class _Captured:
    graph: Any
    inputs: dict[str, torch.Tensor]     # static buffers, [bucket, ...] each
    output: Output                      # [bucket, ...] (or a tuple of them), rewritten by every replay


class DecodeGraphRunner:
    """Runs `fn` through one captured graph per batch bucket.

    pad_values: per input name, the value padded rows get (inputs not named pad with 0).
    capture_context(bucket): entered around the captured call only (not the warmup runs);
    before_replay(bucket): called before every replay, after the inputs are copied in (where
    host arguments of captured task groups are updated).
    The returned tensor (or tuple of tensors, as `fn` returns) is a view into the bucket's
    static output: consume (or clone) it before the next call.
    """

    def __init__(self, fn: StepFn, api: GraphAPI, buckets: list[int],
                 pad_values: dict[str, float] | None = None, warmup_runs: int = 1,
                 capture_context: Callable[[int], ContextManager[Any]] | None = None,
                 before_replay: Callable[[int], None] | None = None) -> None:
        if not buckets or any(b < 1 for b in buckets):
            raise ValueError(f"graph buckets: need positive batch sizes, got {buckets}")
        self.fn, self.api = fn, api
        self.buckets = sorted(set(buckets))
        self.pad_values = dict(pad_values or {})
        self.warmup_runs = warmup_runs
        self.capture_context = capture_context
        self.before_replay = before_replay
        self.graphs: dict[int, _Captured] = {}
        self.num_eager = 0

    def bucket_for(self, batch_size: int) -> int | None:
        """The smallest bucket holding `batch_size` rows, None above the largest."""
        i = bisect.bisect_left(self.buckets, batch_size)
        return self.buckets[i] if i < len(self.buckets) else None

    def __call__(self, inputs: dict[str, torch.Tensor]) -> Output:
        batch_size = _batch_size(inputs)
        bucket = self.bucket_for(batch_size)
        if bucket is None:
            self.num_eager += 1
            return self.fn(inputs)
        captured = self.graphs.get(bucket) or self._capture(bucket, inputs)
        self._fill(captured.inputs, inputs, batch_size)
        if self.api.replays_by_call:
            out = self.fn(captured.inputs)
        else:
            if self.before_replay is not None:
                self.before_replay(bucket)
            captured.graph.replay()
            out = captured.output
        return tuple(t[:batch_size] for t in out) if isinstance(out, tuple) else out[:batch_size]

    def capture(self, bucket: int, example: dict[str, torch.Tensor]) -> None:
        """Capture `bucket`'s graph now from `example` ([bucket, ...] inputs), unless it exists."""
        if bucket not in self.buckets:
            raise ValueError(f"graph bucket {bucket} is not one of {self.buckets}")
        if bucket not in self.graphs:
            self._capture(bucket, example)

    def _capture(self, bucket: int, example: dict[str, torch.Tensor]) -> _Captured:
        static = {name: torch.empty((bucket, *t.shape[1:]), dtype=t.dtype, device=t.device)
                  for name, t in example.items()}
        self._fill(static, example, _batch_size(example))
        if self.api.replays_by_call:             # the first call compiles the step for this shape
            self.graphs[bucket] = _Captured(None, static, self.fn(static))
            self.api.synchronize()
            logger.info("compiled the %s decode step for batch bucket %d", self.api.name, bucket)
            return self.graphs[bucket]
        for _ in range(self.warmup_runs):        # allocator / lazy-init work stays out of the graph
            self.fn(static)
        self.api.synchronize()
        graph = self.api.new_graph()
        context = self.capture_context(bucket) if self.capture_context is not None else nullcontext()
        with context, self.api.capture(graph):
            output = self.fn(static)
        self.api.synchronize()
        logger.info("captured a %s graph for decode batch bucket %d", self.api.name, bucket)
        self.graphs[bucket] = _Captured(graph, static, output)
        return self.graphs[bucket]

    def _fill(self, static: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor], n: int) -> None:
        if static.keys() != inputs.keys():
            raise ValueError(f"graph inputs: expected {sorted(static)}, got {sorted(inputs)}")
        for name, buf in static.items():
            src = inputs[name]
            if src.shape[1:] != buf.shape[1:] or src.dtype != buf.dtype:
                raise ValueError(f"graph input {name!r}: {src.dtype}{list(src.shape)} does not fit "
                                 f"the captured {buf.dtype}{list(buf.shape)}")
            buf[:n].copy_(src)
            buf[n:].fill_(self.pad_values.get(name, 0))


def _batch_size(inputs: dict[str, torch.Tensor]) -> int:
    sizes = {t.shape[0] for t in inputs.values()}
    if len(sizes) != 1:
        raise ValueError(f"graph inputs: all inputs need the same batch size, got {sorted(sizes)}")
    return sizes.pop()
