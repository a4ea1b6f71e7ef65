"""`--distributed-executor-backend ray`: rank 0 in this process, the other ranks as Ray actors on
a local Ray cluster started by the executor, joined in one gloo group. Same greedy tokens as
one process; a killed actor turns health into an error naming the rank; no Ray -> clear error."""
from __future__ import annotations

import sys

import pytest

from ascend_llm import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPTS = [[5, 17, 33, 101], [300, 12, 9, 77, 150, 4, 4]]


def _tokens(llm: LLM) -> list[list[int]]:
    outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def test_ray_backend_without_ray_is_a_clear_error(tiny_llama_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)          # `import ray` raises ImportError
    with pytest.raises(RuntimeError, match="'ray' needs Ray, which is not installed"):
        LLM(str(tiny_llama_dir), max_model_len=128, tensor_parallel_size=2,
            distributed_executor_backend="ray")


@pytest.mark.slow
def test_ray_tp2_matches_one_process_and_reports_a_dead_actor(tiny_llama_dir):
    ray = pytest.importorskip("ray", reason="ray is in the dev extra; this environment lacks it")
    want = _tokens(LLM(str(tiny_llama_dir), max_model_len=128))
    llm = LLM(str(tiny_llama_dir), max_model_len=128, tensor_parallel_size=2,
              distributed_executor_backend="ray")
    try:
        assert llm.llm_engine.check_health() is None
        assert _tokens(llm) == want
        executor = llm.llm_engine.executor
        ray.kill(executor._actors[0])
        ray.wait(executor._runs, timeout=30)
        assert "tensor-parallel worker rank 1 (ray actor) exited" in (llm.llm_engine.check_health() or "")
    finally:
        llm.shutdown()
        ray.shutdown()
