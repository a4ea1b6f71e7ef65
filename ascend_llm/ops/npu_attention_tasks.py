"""Fresh host sequence lengths for npu_fused_infer_attention_score inside a captured ACL graph.

The NPU decode attention takes its sequence lengths as host lists (actual_seq_lengths,
actual_seq_lengths_kv), which an ACL graph freezes at capture. As vllm-ascend does, each
attention launch of a captured decode step is put in its own task group
(`torch.npu.graph_task_group_begin` / `graph_task_group_end`, using the op's `.out` variant
writing into buffers owned by the graph, with a workspace from
`_npu_fused_infer_attention_score_get_max_workspace`); before every replay `update` re-issues
each launch with the step's lengths between `graph_task_update_begin(update_stream, handle)` /
`graph_task_update_end(update_stream)`, which replaces the task's parameters in the graph.

`PagedAttention` (ascend_llm.ops.npu_attention) routes its call here while a capture is active
(`active_capture()`); during capture no device tensor is read on the host (that would be a
synchronizing read, not allowed while capturing): the lengths come from the graph runner.
It lives in ops/ (not graph/) so the attention op finds the active capture without importing
the graph layer; `ascend_llm.graph.model_graphs` opens the capture and calls `update`.

Verified against the emulated torch_npu (tests/ops/npu_emulation.py) only, not on hardware.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Iterator

import torch

_ACTIVE: ContextVar["AttentionTaskGroups | None"] = ContextVar("npu_attention_task_capture", default=None)


def active_capture() -> "AttentionTaskGroups | None":
    """The task groups of the decode graph being captured, None outside a capture."""
    return _ACTIVE.get()


@dataclass(slots=True)
class _Task:
    handle: Any                    # the task group's handle (graph_task_group_end)
    query: torch.Tensor            # the captured tensors the launch reads and writes
    key: torch.Tensor
    value: torch.Tensor
    kwargs: dict[str, Any]         # every argument but the host lengths, workspace and out
    output: torch.Tensor
    softmax_lse: torch.Tensor


class AttentionTaskGroups:
    """The attention launches of one captured graph (one per layer), each in a task group.

    q_lens / kv_lens: the host lengths of the batch being captured (cumulative query ends and
    KV lengths, one per row of the bucket, padding rows included).
    """

    def __init__(self, q_lens: list[int], kv_lens: list[int]) -> None:
        self.q_lens, self.kv_lens = list(q_lens), list(kv_lens)
        self.tasks: list[_Task] = []
        self.workspace: torch.Tensor | None = None     # shared: the layers' launches run in turn
        self.num_updates = 0

    @contextmanager
    def capturing(self) -> Iterator["AttentionTaskGroups"]:
        """Route PagedAttention's launches into task groups of this graph."""
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)

    def attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  kwargs: dict[str, Any]) -> torch.Tensor:
        """One npu_fused_infer_attention_score launch, captured in its own task group."""
        from ascend_llm.ops.npu_runtime import torch_npu

        npu = torch_npu()
        lengths = dict(actual_seq_lengths=self.q_lens, actual_seq_lengths_kv=self.kv_lens)
        if self.workspace is None:
            self.workspace = npu._npu_fused_infer_attention_score_get_max_workspace(
                query, key, value, **kwargs, **lengths)
        output = torch.empty_like(query)
        softmax_lse = torch.empty(query.shape[0], dtype=query.dtype, device=query.device)
        stream = torch.npu.current_stream()
        torch.npu.graph_task_group_begin(stream)
        npu.npu_fused_infer_attention_score.out(query, key, value, **kwargs, **lengths,
                                                workspace=self.workspace, out=[output, softmax_lse])
        handle = torch.npu.graph_task_group_end(stream)
        self.tasks.append(_Task(handle, query, key, value, dict(kwargs), output, softmax_lse))
        return output

    def update(self, q_lens: list[int], kv_lens: list[int], stream: Any) -> None:
        """Re-issue every captured launch with these host lengths on `stream` (the graph's next
        replay uses them). The caller orders it after the previous replay and before the next."""
        from ascend_llm.ops.npu_runtime import torch_npu

        if len(q_lens) != len(self.q_lens) or len(kv_lens) != len(self.kv_lens):
            raise ValueError(f"attention update: {len(kv_lens)} lengths for a graph captured with "
                             f"{len(self.kv_lens)} rows")
        npu = torch_npu()
        with torch.npu.stream(stream):
            for task in self.tasks:
                torch.npu.graph_task_update_begin(stream, task.handle)
                npu.npu_fused_infer_attention_score.out(
                    task.query, task.key, task.value, **task.kwargs, actual_seq_lengths=q_lens,
                    actual_seq_lengths_kv=kv_lens, workspace=self.workspace,
                    out=[task.output, task.softmax_lse])
                torch.npu.graph_task_update_end(stream)
        self.num_updates += 1
