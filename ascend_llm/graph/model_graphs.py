"""Decode graphs for ModelRunner: pure decode steps replayed from a graph captured per batch bucket.

A step is a pure decode step when every scheduled sequence computes exactly one new token at the
end of its sequence and samples from it (no prompt log-probs, no speculative draft tokens). Such a
step with n <= the largest bucket rows runs through `DecodeGraphRunner` (every bucket captured at
start-up, largest first, from padding-only inputs): model forward + LM head on static buffers of the bucket's size, the padding rows
writing their KV into the null block (`ModelRunner.null_block`) and attending to it alone. Prefill,
chunked and mixed steps, steps with speculative drafts, and batches above the largest bucket run
eagerly. Buckets follow vLLM's cudagraph capture sizes: 1, 2, 4, 8, 16, 24, ... up to max_num_seqs.

npu (ACL graphs, torch.npu.NPUGraph): npu_fused_infer_attention_score takes host sequence lengths,
so each attention launch is captured in a task group and updated with the step's lengths before
every replay (`ascend_llm.ops.npu_attention_tasks`), as vllm-ascend does. Verified against the
emulated torch_npu (tests/ops/npu_emulation.py) only, not on Ascend hardware.

torchair graph mode (opt-in, vllm-ascend's `additional_config` torchair_graph_config.enabled):
the same buckets and static buffers, but the step is torch.compile'd with torchair's backend and
called per step instead of replayed (`torchair_graph_api`); the attention's host lengths stay
outside the compiled graphs (graph breaks), so they need no task-group updates.

cuda (torch.cuda.CUDAGraph): the Triton paged attention reads the lengths from device tensors
(context_lens, query_start_loc), so nothing needs updating; max_context_len, which only sizes the
split-KV heuristic, is fixed to the longest sequence. Untested: there is no GPU in CI.

Tensor parallelism: every rank captures its own graphs with the same buckets at the same time
(the engine broadcasts `CaptureDecodeGraphs`), and each graph holds the rank's collectives
(hccl / nccl all-reduce and all-gather), as vllm-ascend's ACL graphs do; every rank takes the
same graph-or-eager decision per step, since all see the same SchedulerOutput. A capture failure
there is an error (ranks cannot fall back to eager one-sidedly without leaving a peer waiting in
a collective): restart with --enforce-eager. Verified with 2 ranks on the emulated torch_npu
(gloo underneath); not with nccl.

`enforce_eager` turns graphs off; the cpu backend always runs eagerly.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

import torch

from ascend_llm.graph.capture import (DecodeGraphRunner, GraphAPI, cuda_graph_api, npu_graph_api,
                                     torchair_graph_api)
from ascend_llm.graph.compile import compile_decode_step, require_torchair
from ascend_llm.models.forward_batch import ForwardBatch
from ascend_llm.ops.attention_metadata import AttentionMetadata
from ascend_llm.ops.npu_attention_tasks import AttentionTaskGroups

if TYPE_CHECKING:
    from ascend_llm.engine.model_runner import ModelRunner
    from ascend_llm.engine.scheduler import SchedulerOutput

logger = logging.getLogger(__name__)

_INPUTS = ("input_ids", "positions", "slot_mapping", "block_tables", "context_lens")


def capture_sizes(max_num_seqs: int) -> list[int]:
    """vLLM's cudagraph capture sizes (1, 2, 4, then multiples of 8) up to max_num_seqs."""
    sizes = [1, 2, 4, *range(8, max_num_seqs + 1, 8)]
    return [s for s in sizes if s <= max_num_seqs]


def create_decode_graphs(runner: "ModelRunner", enforce_eager: bool, max_num_seqs: int,
                         max_model_len: int, torchair_graph: bool = False) -> "DecodeGraphs | None":
    """The runner's decode graphs, or None where decode runs eagerly (enforce_eager, cpu).
    torchair_graph: torch.compile the step with torchair instead of capturing ACL graphs."""
    if enforce_eager or runner.backend not in ("npu", "cuda"):
        return None
    if torchair_graph:
        require_torchair(runner.backend)
        api = torchair_graph_api()
    elif not graph_safe_attention(runner):
        logger.info("decode graphs off: the attention runs the reference kernel (host-side masks)")
        return None
    else:
        api = npu_graph_api() if runner.backend == "npu" else cuda_graph_api()
    max_seq_len = min(max_model_len, runner.num_blocks * runner.block_size)
    graphs = DecodeGraphs(runner, api, capture_sizes(max_num_seqs), max_seq_len)
    logger.info("decode graphs (%s): batch buckets %s", api.name, graphs.buckets)
    graphs.capture_all()
    return graphs


class DecodeGraphs:
    """Runs pure decode steps of `runner` through captured graphs (see the module docstring).

    update_attention: re-issue the NPU attention launches with the step's host lengths before
    each replay (always on in service; tests turn it off to show the lengths would be stale).
    """

    def __init__(self, runner: "ModelRunner", api: GraphAPI, buckets: list[int], max_seq_len: int) -> None:
        self.runner, self.api = runner, api
        self.block_size = runner.block_size
        self.max_blocks = -(-max_seq_len // self.block_size)        # block-table width
        null_slot = runner.null_block * self.block_size
        step = compile_decode_step(self._step, "npu", enforce_eager=False) if api.replays_by_call else self._step
        self.graphs = DecodeGraphRunner(
            step, api, buckets,
            pad_values={"slot_mapping": null_slot, "block_tables": runner.null_block, "context_lens": 1},
            capture_context=self._capture_context if api.name == "npu" else None,
            before_replay=self._before_replay if api.name == "npu" else None)
        self.attention: dict[int, AttentionTaskGroups] = {}          # bucket -> its task groups
        self.update_attention = True
        self.update_stream: Any = None
        self.num_steps = 0                                           # steps run through a graph
        self._kv_lens: list[int] = []                                # this step's, padded to its bucket
        self._scales_ready = False
        self.disabled = False                                        # a capture failed: eager only

    @property
    def buckets(self) -> list[int]:
        return self.graphs.buckets

    def run(self, out: "SchedulerOutput") -> tuple[torch.Tensor, torch.Tensor] | None:
        """(hidden [n, H], logits [n, vocab]) of a pure decode step through its bucket's graph
        (views into the graph's outputs, valid until the next step), or None: run it eagerly."""
        n = len(out.scheduled)
        bucket = self.graphs.bucket_for(n)
        if self.disabled or bucket is None or not is_pure_decode(out) or self._kv_scales_pending():
            return None
        bs, width, null = self.block_size, self.max_blocks, self.runner.null_block
        input_ids, positions, slots, tables, context_lens = [], [], [], [], []
        for item in out.scheduled:
            seq, pos = item.seq, item.start_pos
            table = seq.block_table
            input_ids.append(seq.token_ids[pos])
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            tables.append(table + [null] * (width - len(table)))
            context_lens.append(pos + 1)
        if any(len(t) > width for t in tables):
            return None
        self._kv_lens = context_lens + [1] * (bucket - n)
        device = self.runner.device
        values = (input_ids, positions, slots, tables, context_lens)
        inputs = {name: torch.tensor(v, dtype=torch.long, device=device) for name, v in zip(_INPUTS, values)}
        if bucket not in self.graphs.graphs:
            try:
                hidden, logits = self.graphs(inputs)
            except RuntimeError as exc:     # e.g. a host sync inside the step: stay eager, keep serving
                self._capture_failed(bucket, exc)
                return None
        else:
            hidden, logits = self.graphs(inputs)
        self.num_steps += 1
        return hidden, logits

    def capture_all(self) -> None:
        """Capture every bucket now, largest first, as vLLM does at start-up, so no decode step
        waits for a capture. The inputs are padding rows only (null block, length 1); the NPU
        attention lengths are replaced before every replay. Where KV scales still come from the
        first batch, buckets are captured on first use instead; a failed capture leaves decode
        eager (`disabled`)."""
        if self._kv_scales_pending():
            logger.info("decode graphs: KV scales come from the first batch; buckets are captured on first use")
            return
        for bucket in sorted(self.buckets, reverse=True):
            self._kv_lens = [1] * bucket
            try:
                self.graphs.capture(bucket, self._padding_inputs(bucket))
            except RuntimeError as exc:
                self._capture_failed(bucket, exc)
                return
        logger.info("captured %d decode graphs at start-up", len(self.graphs.graphs))

    def _capture_failed(self, bucket: int, exc: RuntimeError) -> None:
        """One process: decode runs eagerly from now on. Tensor parallelism: raise (see the
        module docstring)."""
        if self.runner.parallel.is_distributed:
            raise RuntimeError(f"rank {self.runner.parallel.rank}: decode graph capture failed for batch "
                               f"bucket {bucket} ({exc}); under tensor parallelism every rank must run "
                               "the same graphs: restart with --enforce-eager") from exc
        logger.warning("decode graph capture failed for bucket %d (%s); decode runs eagerly from now on",
                       bucket, exc)
        self.disabled = True

    def _padding_inputs(self, bucket: int) -> dict[str, torch.Tensor]:
        """[bucket, ...] decode inputs whose every row is a padding row."""
        device, null = self.runner.device, self.runner.null_block
        full = lambda shape, value: torch.full(shape, value, dtype=torch.long, device=device)  # noqa: E731
        return {"input_ids": full((bucket,), 0), "positions": full((bucket,), 0),
                "slot_mapping": full((bucket,), null * self.block_size),
                "block_tables": full((bucket, self.max_blocks), null), "context_lens": full((bucket,), 1)}

    def _step(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Model forward + LM head of a decode batch on (static) device inputs [b, ...]."""
        ids, tables = inputs["input_ids"], inputs["block_tables"]
        b, device = ids.shape[0], ids.device
        rows = torch.arange(b, device=device)
        meta = AttentionMetadata(
            slot_mapping=inputs["slot_mapping"], block_tables=tables, context_lens=inputs["context_lens"],
            query_start_loc=torch.arange(b + 1, device=device), max_query_len=1,
            max_context_len=self.max_blocks * self.block_size, kv_block_ids=tables.reshape(-1),
            attn_mask=None, query_pad_index=rows.view(b, 1), query_unpad_index=rows)
        model = self.runner.model
        hidden = model(ForwardBatch(ids, inputs["positions"], meta, self.runner.kv_caches, rows))
        return hidden, model.compute_logits(hidden)

    @contextmanager
    def _capture_context(self, bucket: int) -> Iterator[None]:
        groups = AttentionTaskGroups(list(range(1, bucket + 1)), self._kv_lens)
        with groups.capturing():
            yield
        self.attention[bucket] = groups

    def _before_replay(self, bucket: int) -> None:
        if not self.update_attention:
            return
        if self.update_stream is None:
            self.update_stream = torch.npu.Stream()
        self.api.synchronize()           # the previous replay no longer reads the task parameters
        self.attention[bucket].update(list(range(1, bucket + 1)), self._kv_lens, self.update_stream)
        self.api.synchronize()           # the updates land before this replay

    def _kv_scales_pending(self) -> bool:
        """KV scales still to be calculated from a batch (only before the first prefill)."""
        if not self._scales_ready:
            from ascend_llm.layers.attention import Attention
            self._scales_ready = not any(m.kv_scales_pending for m in self.runner.model.modules()
                                         if isinstance(m, Attention))
        return not self._scales_ready


# the paged-attention kernels a decode graph can hold: the NPU one (host lengths updated through
# task groups) and the Triton one (device lengths); the reference kernel builds host-side masks
_GRAPH_ATTENTION = {"npu": "ascend_llm.ops.npu_attention", "cuda": "ascend_llm.ops.triton.paged_attention"}


def graph_safe_attention(runner: "ModelRunner") -> bool:
    """Whether every attention layer of the runner's model runs its backend's graph-safe kernel
    (not the reference fallback, e.g. for a KV-cache dtype the device kernel lacks)."""
    from ascend_llm.layers.attention import Attention

    want = _GRAPH_ATTENTION.get(runner.backend)
    kernels = [m._paged_attention for m in runner.model.modules() if isinstance(m, Attention)]
    return bool(kernels) and all(getattr(k, "__module__", None) == want for k in kernels)


def is_pure_decode(out: "SchedulerOutput") -> bool:
    """Every scheduled sequence computes one new token, its last, and samples from it: no
    prefill chunk, no prompt log-probs to score, no speculative draft tokens."""
    for item in out.scheduled:
        seq = item.seq
        if (item.num_new_tokens != 1 or not item.do_sample or getattr(item, "spec_token_ids", None)
                or item.start_pos != len(seq.token_ids) - 1 or item.start_pos < seq.num_prompt_tokens - 1):
            return False
    return bool(out.scheduled)
