"""Decode ACL graphs in the engine on the emulated torch_npu.

`LLM(..., device="npu")` runs pure decode steps through a graph captured per batch bucket, its
attention launches in task groups whose host sequence lengths are updated before every replay
(ascend_llm.graph.model_graphs, ascend_llm.ops.npu_attention_tasks); prefill steps and batches above the largest
bucket run eagerly. The emulated NPUGraph replays the recorded aten ops, so host values captured
into the graph stay frozen unless a task-group update replaces them, as on the device.
"""
from __future__ import annotations

import sys
import types
from importlib.machinery import ModuleSpec
from types import SimpleNamespace

import pytest
import torch

from ascend_llm import LLM, SamplingParams
from ascend_llm.graph import compile_decode_step
from ascend_llm.graph.model_graphs import capture_sizes, graph_safe_attention, is_pure_decode
from tests.ops.npu_emulation import NPUArgumentError, npu_emulation  # noqa: F401  (fixture)
from tests.tiny_models import make_tiny_moe_model_dir

NUM_LAYERS = 2          # tests/tiny_models.py


def _prompts(count: int) -> list[list[int]]:
    return [[(7 * i + 13 * j) % 381 + 3 for j in range(3 + 5 * i)] for i in range(count)]


def _params(count: int) -> list[SamplingParams]:
    """Different lengths, so the batch shrinks step by step (buckets 8 -> 4 -> 2 -> 1)."""
    return [SamplingParams(max_tokens=3 + 2 * i, temperature=0.0, ignore_eos=True, logprobs=2)
            for i in range(count)]


def _generate(model_dir, count: int, **kwargs) -> tuple[LLM, list[tuple[list[int], list[float]]]]:
    llm = LLM(str(model_dir), device="npu", dtype="float16", max_model_len=96, **kwargs)
    outs = llm.generate(prompt_token_ids=_prompts(count), sampling_params=_params(count), use_tqdm=False)
    result = []
    for o in outs:
        c = o.outputs[0]
        result.append((c.token_ids, [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]))
    return llm, result


def _replays(llm: LLM) -> dict[int, int]:
    graphs = llm.llm_engine.model_runner.decode_graphs
    return {b: c.graph.num_replays for b, c in sorted(graphs.graphs.graphs.items())}


def _eager_attention_steps(fake) -> int:
    return len(fake.called("npu_fused_infer_attention_score")) // NUM_LAYERS


def test_graph_decode_matches_eager_with_changing_lengths(tiny_llama_dir, npu_emulation):
    fake = npu_emulation
    _, eager = _generate(tiny_llama_dir, 6, enforce_eager=True, max_num_seqs=8)
    eager_steps = _eager_attention_steps(fake)
    fake.calls.clear()
    llm, graphed = _generate(tiny_llama_dir, 6, max_num_seqs=8)
    assert graphed == eager                          # tokens and logprobs, bit for bit
    graphs = llm.llm_engine.model_runner.decode_graphs
    assert graphs.buckets == [1, 2, 4, 8]
    # max_tokens 3, 5, ..., 13: one prefill step, then 12 decode steps with 6, 6, 5, 5, 4, 4,
    # 3, 3, 2, 2, 1, 1 sequences -> buckets 8 (4 steps), 4 (4), 2 (2), 1 (2)
    assert eager_steps == 13
    assert _replays(llm) == {1: 2, 2: 2, 4: 4, 8: 4} and graphs.num_steps == 12
    # eager: the prefill and one warmup run per bucket before its capture
    assert _eager_attention_steps(fake) == 1 + 4
    for bucket, groups in graphs.attention.items():  # one task group per layer, updated every replay
        assert len(groups.tasks) == NUM_LAYERS and groups.num_updates == _replays(llm)[bucket]
        assert all(task.handle.num_updates == groups.num_updates for task in groups.tasks)
    launches = fake.called("npu_fused_infer_attention_score.out")
    assert len(launches) == NUM_LAYERS * (len(graphs.attention) + graphs.num_steps)   # captures + updates


def test_without_the_task_group_update_the_lengths_are_stale(tiny_llama_dir, npu_emulation):
    """The update is what keeps the graph right: replays that skip it attend with the lengths
    captured at start-up (padding rows, length 1), so the context is not seen and every decode
    step drifts."""
    _, eager = _generate(tiny_llama_dir, 3, enforce_eager=True, max_num_seqs=4)
    llm = LLM(str(tiny_llama_dir), device="npu", dtype="float16", max_model_len=96, max_num_seqs=4)
    graphs = llm.llm_engine.model_runner.decode_graphs
    graphs.update_attention = False
    outs = llm.generate(prompt_token_ids=_prompts(3), sampling_params=_params(3), use_tqdm=False)
    stale = [(c.token_ids, [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)])
             for c in (o.outputs[0] for o in outs)]
    assert graphs.num_steps > 0 and all(g.num_updates == 0 for g in graphs.attention.values())
    # the first token comes from the (eager) prefill and agrees; the first decode step already drifts
    assert [s[1][0] for s in stale] == [e[1][0] for e in eager]
    assert all(abs(s[1][1] - e[1][1]) > 1e-3 for s, e in zip(stale, eager))


def test_every_bucket_is_captured_at_start_up(tiny_llama_dir, npu_emulation):
    """As vLLM does: no decode step waits for a capture; nothing is replayed before a request."""
    fake = npu_emulation
    fake.calls.clear()
    llm = LLM(str(tiny_llama_dir), device="npu", dtype="float16", max_model_len=96, max_num_seqs=16)
    graphs = llm.llm_engine.model_runner.decode_graphs
    assert sorted(graphs.graphs.graphs) == graphs.buckets == [1, 2, 4, 8, 16]
    assert _replays(llm) == dict.fromkeys([1, 2, 4, 8, 16], 0) and not graphs.disabled
    assert _eager_attention_steps(fake) == 5                  # one warmup run per bucket, no request yet
    assert sorted(graphs.attention) == [1, 2, 4, 8, 16]


def test_calculated_kv_scales_defer_capture_to_first_use(tiny_llama_dir, npu_emulation):
    """KV scales taken from the first batch must exist before a graph freezes them."""
    llm = LLM(str(tiny_llama_dir), device="npu", dtype="float16", max_model_len=96, max_num_seqs=4,
              kv_cache_dtype="int8", calculate_kv_scales=True)
    graphs = llm.llm_engine.model_runner.decode_graphs
    if graphs is None:
        pytest.fail("int8 KV on the emulated NPU should keep decode graphs")
    assert graphs.graphs.graphs == {}
    llm.generate(prompt_token_ids=_prompts(2), sampling_params=_params(2), use_tqdm=False)
    assert graphs.num_steps > 0 and graphs.graphs.graphs


def test_batches_above_the_largest_bucket_run_eagerly(tiny_llama_dir, npu_emulation):
    fake = npu_emulation
    _, eager = _generate(tiny_llama_dir, 6, enforce_eager=True, max_num_seqs=6)
    fake.calls.clear()
    llm, graphed = _generate(tiny_llama_dir, 6, max_num_seqs=6)
    assert graphed == eager
    assert llm.llm_engine.model_runner.decode_graphs.buckets == [1, 2, 4]
    # decode steps with 6, 6, 5, 5 sequences run eagerly (+ the prefill and 3 capture warmups),
    # then 4 ... 1 in graphs
    assert _eager_attention_steps(fake) == 5 + 3
    assert _replays(llm) == {1: 2, 2: 2, 4: 4}


def test_prefill_and_chunked_steps_run_eagerly(tiny_llama_dir, npu_emulation):
    """A prompt chunked over several steps, alongside a decoding sequence: mixed steps are eager."""
    fake = npu_emulation
    prompts = [_prompts(1)[0], [(5 * j + 1) % 381 + 3 for j in range(40)]]
    params = [SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)] * 2
    run = lambda **kw: [o.outputs[0].token_ids for o in LLM(  # noqa: E731
        str(tiny_llama_dir), device="npu", dtype="float16", max_model_len=96, max_num_batched_tokens=16,
        **kw).generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)]
    eager = run(enforce_eager=True)
    eager_steps = _eager_attention_steps(fake)
    fake.calls.clear()
    assert run() == eager
    graph_steps = len(fake.called("npu_fused_infer_attention_score.out")) // NUM_LAYERS
    warmups = len(capture_sizes(64))                  # one eager run per bucket, at start-up
    assert 0 < _eager_attention_steps(fake) - warmups < eager_steps and graph_steps > 0


def test_moe_graph_decode_matches_eager(tmp_path, npu_emulation):
    """MoE routing stays on the device (group sizes as a device tensor), so the captured expert
    grouped matmuls follow each replay's routing: weight-only int8 Qwen2-MoE."""
    model_dir = make_tiny_moe_model_dir(tmp_path / "moe", "qwen2_moe")
    _, eager = _generate(model_dir, 3, enforce_eager=True, max_num_seqs=4, quantization="wint8")
    llm, graphed = _generate(model_dir, 3, max_num_seqs=4, quantization="wint8")
    assert graphed == eager and llm.llm_engine.model_runner.decode_graphs.num_steps > 0


def test_enforce_eager_cpu_and_reference_attention_have_no_graphs(tiny_llama_dir, npu_emulation):
    from ascend_llm.ops import cpu as cpu_ops

    llm = LLM(str(tiny_llama_dir), device="npu", dtype="float16", max_model_len=64)
    runner = llm.llm_engine.model_runner
    assert graph_safe_attention(runner) and runner.decode_graphs is not None
    layer = next(m for m in runner.model.modules() if hasattr(m, "_paged_attention"))
    layer._paged_attention = cpu_ops.paged_attention          # the reference fallback's kernel
    assert not graph_safe_attention(runner)
    assert LLM(str(tiny_llama_dir), device="npu", dtype="float16", max_model_len=64,
               enforce_eager=True).llm_engine.model_runner.decode_graphs is None
    assert LLM(str(tiny_llama_dir), device="cpu", max_model_len=64).llm_engine.model_runner.decode_graphs is None


def test_capture_sizes_and_pure_decode():
    assert capture_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert capture_sizes(6) == [1, 2, 4] and capture_sizes(1) == [1]
    seq = SimpleNamespace(token_ids=[5, 6, 7, 8], num_prompt_tokens=3)
    item = lambda **kw: SimpleNamespace(**{"seq": seq, "start_pos": 3, "num_new_tokens": 1,  # noqa: E731
                                           "do_sample": True, **kw})
    out = lambda *items: SimpleNamespace(scheduled=list(items))  # noqa: E731
    assert is_pure_decode(out(item(), item()))
    assert not is_pure_decode(out())
    assert not is_pure_decode(out(item(), item(start_pos=1, num_new_tokens=3)))      # a prefill chunk
    assert not is_pure_decode(out(item(spec_token_ids=[9, 9])))                    # speculative drafts
    assert not is_pure_decode(out(item(do_sample=False)))


# ----------------------------------------------------------------- the emulated task-group API

def _fia_args() -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, 8, generator=g).half()
    key = torch.randn(3, 16, 2 * 8, generator=g).half()
    value = torch.randn(3, 16, 2 * 8, generator=g).half()
    kwargs = dict(atten_mask=torch.ones(2048, 2048, dtype=torch.bool).triu(1),
                  block_table=torch.tensor([[0, 1], [2, 0]], dtype=torch.int32), num_heads=4,
                  num_key_value_heads=2, scale=0.3, input_layout="TND", sparse_mode=3, block_size=16)
    return (query, key, value), kwargs


def test_task_group_update_replaces_the_captured_lengths(npu_emulation):
    npu = npu_emulation
    (q, k, v), kw = _fia_args()
    expected = lambda kv: npu.npu_fused_infer_attention_score(  # noqa: E731
        q, k, v, actual_seq_lengths=[1, 2], actual_seq_lengths_kv=kv, **kw)[0]
    workspace = npu._npu_fused_infer_attention_score_get_max_workspace(
        q, k, v, actual_seq_lengths=[1, 2], actual_seq_lengths_kv=[5, 9], **kw)
    out, lse = torch.empty_like(q), torch.empty(2, dtype=q.dtype)
    graph = torch.npu.NPUGraph()
    with torch.npu.graph(graph):
        stream = torch.npu.current_stream()
        torch.npu.graph_task_group_begin(stream)
        npu.npu_fused_infer_attention_score.out(q, k, v, actual_seq_lengths=[1, 2], actual_seq_lengths_kv=[5, 9],
                                                **kw, workspace=workspace, out=[out, lse])
        handle = torch.npu.graph_task_group_end(stream)
    out.zero_()
    graph.replay()                                            # no update: the captured lengths
    assert torch.equal(out, expected([5, 9]))
    update_stream = torch.npu.Stream()
    with torch.npu.stream(update_stream):
        torch.npu.graph_task_update_begin(update_stream, handle)
        npu.npu_fused_infer_attention_score.out(q, k, v, actual_seq_lengths=[1, 2], actual_seq_lengths_kv=[17, 3],
                                                **kw, workspace=workspace, out=[out, lse])
        torch.npu.graph_task_update_end(update_stream)
    out.zero_()
    graph.replay()
    assert torch.equal(out, expected([17, 3])) and not torch.equal(out, expected([5, 9]))
    graph.replay()                                            # the update stays in the graph
    assert torch.equal(out, expected([17, 3])) and handle.num_updates == 1

    # what the hardware rejects
    with pytest.raises(NPUArgumentError, match="only inside a graph capture"):
        torch.npu.graph_task_group_begin(stream)
    with pytest.raises(NPUArgumentError, match="not a task group"):
        torch.npu.graph_task_update_begin(update_stream, object())
    torch.npu.graph_task_update_begin(update_stream, handle)
    with pytest.raises(NPUArgumentError, match="still open"):
        graph.replay()
    with pytest.raises(NPUArgumentError, match="the task group captured"):
        torch.npu.graph_task_update_end(update_stream)        # launched nothing
    with pytest.raises(NPUArgumentError, match="workspace must come from"):
        npu.npu_fused_infer_attention_score.out(q, k, v, actual_seq_lengths=[1, 2], actual_seq_lengths_kv=[5, 9],
                                                **kw, workspace=torch.empty(8, dtype=torch.uint8), out=[out, lse])
    graph.reset()
    with pytest.raises(NPUArgumentError, match="reset or re-captured"):
        torch.npu.graph_task_update_begin(update_stream, handle)


# ---------------------------------------------------------------------- torchair (compile.py)

@pytest.fixture
def fake_torchair(monkeypatch) -> list[int]:
    """A stand-in torchair whose NPU backend runs the FX graph as traced; returns the node counts
    of the graphs it was given (torchair itself needs CANN)."""
    compiled: list[int] = []

    def get_npu_backend(compiler_config=None):
        assert isinstance(compiler_config, torchair.CompilerConfig)

        def backend(gm: torch.fx.GraphModule, example_inputs):
            compiled.append(len(gm.graph.nodes))
            return gm.forward
        return backend

    torchair = types.ModuleType("torchair")
    torchair.__spec__ = ModuleSpec("torchair", loader=None)
    torchair.CompilerConfig = type("CompilerConfig", (), {})
    torchair.get_npu_backend = get_npu_backend
    monkeypatch.setitem(sys.modules, "torchair", torchair)
    torch._dynamo.reset()
    yield compiled
    torch._dynamo.reset()


def test_torchair_backend_is_used_for_npu_when_installed(fake_torchair):
    def step(x: torch.Tensor) -> torch.Tensor:
        return (x * 2 + 1).sum(-1)

    compiled = compile_decode_step(step, "npu", enforce_eager=False)
    assert compiled is not step
    x = torch.arange(6.0).view(2, 3)
    assert torch.equal(compiled(x), step(x)) and fake_torchair
    assert compile_decode_step(step, "npu", enforce_eager=True) is step


TORCHAIR_ON = {"torchair_graph_config": {"enabled": True}}


def test_torchair_graph_mode_runs_decode_compiled(tiny_llama_dir, npu_emulation, fake_torchair):
    """vllm-ascend's additional_config torchair_graph_config: decode steps of each bucket run the
    torchair-compiled step on static shapes, no ACL graph is captured, output equals eager."""
    _, eager = _generate(tiny_llama_dir, 6, enforce_eager=True, max_num_seqs=8)
    assert not fake_torchair
    llm, compiled = _generate(tiny_llama_dir, 6, max_num_seqs=8, additional_config=TORCHAIR_ON)
    assert compiled == eager                              # tokens and logprobs, bit for bit
    graphs = llm.llm_engine.model_runner.decode_graphs
    assert graphs.api.name == "torchair" and graphs.num_steps == 12 and fake_torchair
    assert sorted(graphs.graphs.graphs) == [1, 2, 4, 8]   # compiled at start-up, one shape each
    assert all(c.graph is None for c in graphs.graphs.graphs.values()) and not graphs.attention


def test_torchair_graph_mode_errors(tiny_llama_dir, npu_emulation, caplog):
    with pytest.raises(ValueError, match=r"torchair_graph_config.enabled: torchair is not installed"):
        LLM(str(tiny_llama_dir), device="npu", dtype="float16", additional_config=TORCHAIR_ON)
    with pytest.raises(ValueError, match=r"torchair graph mode needs --device npu, not 'cpu'"):
        LLM(str(tiny_llama_dir), device="cpu", additional_config=TORCHAIR_ON)
    bad = [('{"torchair_graph_config": ', "additional_config: not valid JSON"),
           ('{"torchair_graph_config": {"enabled": "yes"}}', r"enabled: expected true or false, got 'yes'"),
           ({"torchair_graph_config": [1]}, r"torchair_graph_config: expected a JSON object, got \[1\]")]
    for value, message in bad:
        with pytest.raises(ValueError, match=message):
            LLM(str(tiny_llama_dir), device="npu", dtype="float16", additional_config=value)
    # --enforce-eager turns it off (no torchair needed); keys we do not act on are named, not fatal
    llm = LLM(str(tiny_llama_dir), device="npu", dtype="float16", enforce_eager=True,
              additional_config='{"torchair_graph_config": {"enabled": true, "use_cached_graph": true}, '
                                '"ascend_scheduler_config": {"enabled": true}}')
    assert llm.llm_engine.model_runner.decode_graphs is None
    assert "ignoring ['ascend_scheduler_config', 'torchair_graph_config.use_cached_graph']" in caplog.text


def test_a_failed_capture_falls_back_to_eager(tiny_llama_dir, npu_emulation, monkeypatch):
    """A capture that raises (e.g. a host sync on real hardware) leaves decode eager, with the
    same output, instead of failing the request."""
    _, eager = _generate(tiny_llama_dir, 3, enforce_eager=True, max_num_seqs=4)

    def broken_graph():
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.npu, "NPUGraph", broken_graph)
    llm, got = _generate(tiny_llama_dir, 3, max_num_seqs=4)
    graphs = llm.llm_engine.model_runner.decode_graphs
    assert got == eager and graphs.disabled and graphs.num_steps == 0
