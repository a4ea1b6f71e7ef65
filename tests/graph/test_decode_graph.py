"""DecodeGraphRunner with the emulated NPUGraph: a toy decode step that writes a KV cache and
attends over it with device-side metadata gives bit-identical greedy tokens and logits with and
without graphs (up to fp32 rounding where BLAS varies with the row count), captures once per batch bucket, pads, and falls back to eager above the largest
bucket. The emulated NPUGraph really replays the recorded aten ops on the captured buffers, so a
step that read host values during capture would replay stale ones."""
from __future__ import annotations

import pytest
import torch

from ascend_llm.graph import DecodeGraphRunner, compile_decode_step, npu_graph_api
from tests.ops.npu_emulation import npu_emulation  # noqa: F401  (fixture)

VOCAB, DIM, SLOTS = 50, 16, 64
NULL_SLOT = SLOTS - 1           # padded rows write here and attend only to it


class ToyDecoder:
    """Embedding -> one attention over a flat KV cache -> logits; the cache lives here."""

    def __init__(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.randn(VOCAB, DIM, generator=g)
        self.wq, self.wk, self.wv = (torch.randn(DIM, DIM, generator=g) * 0.3 for _ in range(3))
        self.wo = torch.randn(DIM, VOCAB, generator=g)
        self.k_cache = torch.zeros(SLOTS, DIM)
        self.v_cache = torch.zeros(SLOTS, DIM)

    def step(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x = self.emb[inputs["token_ids"]]                                          # [B, D]
        self.k_cache.index_copy_(0, inputs["slots"], x @ self.wk)
        self.v_cache.index_copy_(0, inputs["slots"], x @ self.wv)
        pos = torch.arange(SLOTS)
        start = inputs["seq_start"].unsqueeze(1)
        visible = (pos >= start) & (pos < start + inputs["context_lens"].unsqueeze(1))   # [B, SLOTS]
        scores = ((x @ self.wq) @ self.k_cache.T).masked_fill(~visible, float("-inf"))
        return (scores.softmax(-1) @ self.v_cache) @ self.wo                       # [B, VOCAB]


PAD = {"token_ids": 0, "slots": NULL_SLOT, "seq_start": NULL_SLOT, "context_lens": 1}


def _generate(step, num_seqs: int, steps: int) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy decode of num_seqs sequences (each owning 12 slots); one finishes early so the batch shrinks."""
    tokens = [[3 + s] for s in range(num_seqs)]
    logits_seen = []
    for t in range(steps):
        active = [s for s in range(num_seqs) if not (s == 0 and t >= 3)]
        inputs = {"token_ids": torch.tensor([tokens[s][-1] for s in active]),
                  "slots": torch.tensor([12 * s + t for s in active]),
                  "seq_start": torch.tensor([12 * s for s in active]),
                  "context_lens": torch.tensor([t + 1] * len(active))}
        logits = step(inputs).clone()
        logits_seen.append(logits)
        for row, s in enumerate(active):
            tokens[s].append(int(logits[row].argmax()))
    return tokens, logits_seen


def test_graph_decode_is_identical_to_eager(npu_emulation):
    eager_tokens, eager_logits = _generate(ToyDecoder(0).step, 3, 6)
    model = ToyDecoder(0)
    runner = DecodeGraphRunner(model.step, npu_graph_api(), buckets=[1, 2, 4], pad_values=PAD)
    graph_tokens, graph_logits = _generate(runner, 3, 6)
    assert graph_tokens == eager_tokens
    for a, b in zip(eager_logits, graph_logits):
        # the graph runs the padded bucket (4 rows for 3): BLAS may pick another kernel for
        # another row count (it does on AMD EPYC), so equal up to fp32 rounding, not bit for bit
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-4)     # logits ~10: ~1e-5 relative
    # batch 3 -> bucket 4 (steps 0-2), batch 2 -> bucket 2 (steps 3-5): one capture each
    assert sorted(runner.graphs) == [2, 4]
    assert runner.graphs[4].graph.num_replays == 3 and runner.graphs[2].graph.num_replays == 3
    assert runner.num_eager == 0


def test_batches_above_the_largest_bucket_run_eagerly(npu_emulation):
    eager_tokens, _ = _generate(ToyDecoder(1).step, 5, 2)
    runner = DecodeGraphRunner(ToyDecoder(1).step, npu_graph_api(), buckets=[1, 2], pad_values=PAD)
    tokens, _ = _generate(runner, 5, 2)
    assert tokens == eager_tokens and runner.num_eager == 2 and not runner.graphs


def test_bucket_choice_and_input_checks(npu_emulation):
    runner = DecodeGraphRunner(ToyDecoder(2).step, npu_graph_api(), buckets=[8, 1, 4, 2], pad_values=PAD)
    assert [runner.bucket_for(n) for n in (1, 3, 5, 8, 9)] == [1, 4, 8, 8, None]
    with pytest.raises(ValueError, match="same batch size"):
        runner({"token_ids": torch.tensor([1, 2]), "slots": torch.tensor([0]),
                "seq_start": torch.tensor([0]), "context_lens": torch.tensor([1])})
    with pytest.raises(ValueError, match="positive batch sizes"):
        DecodeGraphRunner(ToyDecoder(2).step, npu_graph_api(), buckets=[0])


def test_graph_api_needs_torch_npu(monkeypatch):
    monkeypatch.delattr(torch, "npu", raising=False)
    with pytest.raises(ValueError, match="NPUGraph is unavailable"):
        npu_graph_api()


def test_enforce_eager_returns_the_step_unchanged():
    step = ToyDecoder(3).step
    assert compile_decode_step(step, "npu", enforce_eager=True) is step
    # no torchair here: the NPU step stays eager rather than failing
    assert compile_decode_step(step, "npu", enforce_eager=False) is step


def test_host_values_read_during_capture_are_frozen(npu_emulation):
    """Why the NPU attention needs the task-group update (ascend_llm.ops.npu_attention_tasks,
    tests/graph/test_npu_decode_graph_engine.py): npu_fused_infer_attention_score takes the
    sequence lengths as host lists, and a replay keeps the captured ones (as on the device)."""
    def step(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        length = int(inputs["context_lens"].max())            # a host read, like .tolist()
        return torch.arange(SLOTS)[:length].sum().expand(inputs["context_lens"].shape[0]).clone()

    runner = DecodeGraphRunner(step, npu_graph_api(), buckets=[2])
    first = runner({"context_lens": torch.tensor([3, 3])}).clone()
    second = runner({"context_lens": torch.tensor([5, 5])})
    assert first.tolist() == [3, 3] and second.tolist() == [3, 3]          # eager would give [10, 10]
    assert step({"context_lens": torch.tensor([5, 5])}).tolist() == [10, 10]
