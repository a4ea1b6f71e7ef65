"""Tensor parallelism on the emulated torch_npu: `LLM(device="npu", tensor_parallel_size=2)`.

The driver installs the emulation as usual; the spawned worker rank imports it through
ASCEND_LLM_TORCH_NPU_MODULE=tests.ops.npu_shim, and gloo stands in for hccl
(`FakeTorchNPU.emulated_dist_backend`). Checked here:
- the 2-rank NPU engine against the one-process CPU engine (the bounds of
  tests/e2e/test_npu_backend.py: same kernels, different rounding), float and W8A8 static
  (quant_bias added on rank 0 only);
- decode ACL graphs under TP: every rank captures its buckets at start-up (the worker says so in
  its log), the graphs hold the ranks' all-reduces, and their tokens and log-probs equal the
  eager TP run's bit for bit. The emulated replay waits on each replayed collective, as the
  graph's stream orders it; without that wait the graphed tokens come out wrong (checked by hand).
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from ascend_llm import LLM, SamplingParams
from ascend_llm.distributed.parallel_state import ParallelContext
from ascend_llm.graph.model_graphs import DecodeGraphs
from ascend_llm.outputs import RequestOutput
from ascend_llm.platform import TORCH_NPU_MODULE_ENV
from tests.e2e.test_npu_backend import assert_same_greedy_up_to_ties
from tests.ops.npu_emulation import FakeTorchNPU, install_fake_torch_npu
from tests.quant.w8a8_writer import ALL_PROJ, write_w8a8_checkpoint

PARAMS = SamplingParams(max_tokens=8, prompt_logprobs=0, logprobs=5, temperature=0.0, ignore_eos=True)
PROMPTS = [[(7 * i + 13 * j) % 381 + 3 for j in range(5 + 9 * i)] for i in range(4)]


@pytest.fixture
def npu_ranks(monkeypatch: pytest.MonkeyPatch) -> FakeTorchNPU:
    """The emulation in this process (the driver) and in every rank it spawns."""
    monkeypatch.setenv(TORCH_NPU_MODULE_ENV, "tests.ops.npu_shim")
    return install_fake_torch_npu(monkeypatch)


def _run(model_dir, **kwargs) -> tuple[list[RequestOutput], dict]:
    """Outputs and the driver's decode-graph facts; the engine is shut down before returning."""
    llm = LLM(str(model_dir), dtype="float16", max_model_len=128, max_num_seqs=4, **kwargs)
    try:
        outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=PARAMS, use_tqdm=False)
        graphs = llm.llm_engine.model_runner.decode_graphs
        facts = {} if graphs is None else {
            "steps": graphs.num_steps, "buckets": sorted(graphs.graphs.graphs),
            "ops": [str(op[0]) for c in graphs.graphs.graphs.values() for entry in c.graph._ops
                    for op in (entry.ops if hasattr(entry, "ops") else [entry])]}
        return outs, facts
    finally:
        llm.llm_engine.shutdown()


def _prompt_logprobs(outs: list[RequestOutput]):
    return [entry[tok].logprob for p, o in zip(PROMPTS, outs) for tok, entry in zip(p[1:], o.prompt_logprobs[1:])]


def _sampled(outs: list[RequestOutput]) -> list[tuple[list[int], list[float]]]:
    return [(c.token_ids, [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)])
            for c in (o.outputs[0] for o in outs)]


@pytest.mark.parametrize("method,bound", [("float", (0.01, 0.002)),
                                          pytest.param("w8a8_static", (0.15, 0.03), marks=pytest.mark.slow)])
def test_tp2_npu_matches_cpu_and_graphs_match_eager(tiny_llama_dir, tmp_path, npu_ranks, capfd, method, bound):
    model_dir = tiny_llama_dir if method == "float" else write_w8a8_checkpoint(
        tiny_llama_dir, tmp_path / "w8a8", dict.fromkeys(ALL_PROJ, "W8A8"))
    cpu, _ = _run(model_dir, device="cpu")
    npu_calls_before = len(npu_ranks.calls)
    eager, no_graphs = _run(model_dir, device="npu", tensor_parallel_size=2, enforce_eager=True)
    graphed, facts = _run(model_dir, device="npu", tensor_parallel_size=2)

    assert no_graphs == {}
    assert _sampled(graphed) == _sampled(eager)                       # bit for bit
    assert _prompt_logprobs(graphed) == _prompt_logprobs(eager)
    diffs = [abs(a - b) for a, b in zip(_prompt_logprobs(cpu), _prompt_logprobs(eager))]
    assert max(diffs) < bound[0] and sum(diffs) / len(diffs) < bound[1]
    assert assert_same_greedy_up_to_ties(cpu, eager) >= 2

    names = {c.name for c in npu_ranks.calls[npu_calls_before:]}
    assert {"npu_fused_infer_attention_score", "npu_add_rms_norm", "npu_rotary_mul"} <= names
    if method == "w8a8_static":
        assert "npu_quant_matmul" in names
    # 4 prompts of 8 tokens: 7 decode steps with 4 sequences, all through bucket 4
    assert facts["buckets"] == [1, 2, 4] and facts["steps"] == 7
    assert any(op.startswith("c10d.allreduce_") for op in facts["ops"])
    assert "[tp rank 1] INFO ascend_llm.graph.model_graphs: captured 3 decode graphs at start-up" in capfd.readouterr().err


def _graphs_stub(world_size: int) -> SimpleNamespace:
    return SimpleNamespace(runner=SimpleNamespace(parallel=ParallelContext(0, world_size)), disabled=False)


def test_a_failed_capture_under_tp_is_an_error_naming_enforce_eager():
    """One rank cannot fall back to eager alone (a peer would wait in a collective forever)."""
    stub = _graphs_stub(2)
    with pytest.raises(RuntimeError, match=r"rank 0: decode graph capture failed for batch bucket 4 "
                                           r"\(host sync\).*--enforce-eager"):
        DecodeGraphs._capture_failed(stub, 4, RuntimeError("host sync"))
    single = _graphs_stub(1)
    DecodeGraphs._capture_failed(single, 4, RuntimeError("host sync"))
    assert single.disabled
