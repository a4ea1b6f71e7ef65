"""The real default model: greedy output is the same alone, in a mixed batch of 16, and after
preemption; chat answers sensibly."""
from __future__ import annotations

from pathlib import Path

import pytest

from ascend_llm import LLM, SamplingParams

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "eval_tempest.txt"
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def real_prompts(tokenizer, n: int = 16) -> list[list[int]]:
    text = DATA.read_text() if DATA.exists() else "Full fathom five thy father lies; " * 400
    ids = tokenizer.encode(text[5000:20000])
    return [ids[i * 97: i * 97 + 5 + (i * 23) % 90] for i in range(n)]


@pytest.mark.slow
def test_smollm2_greedy_is_batch_and_preemption_invariant():
    llm = LLM("smollm2-135m-instruct", max_model_len=512, kv_cache_memory_gb=0.25)
    prompts = real_prompts(llm.get_tokenizer())
    batched = [o.outputs[0].token_ids for o in
               llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False)]
    alone = [llm.generate(prompt_token_ids=[p], sampling_params=GREEDY, use_tqdm=False)[0].outputs[0].token_ids
             for p in prompts[:4]]
    assert batched[:4] == alone
    small = LLM("smollm2-135m-instruct", max_model_len=256, num_gpu_blocks_override=24, block_size=16)
    preempted = [o.outputs[0].token_ids for o in
                 small.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False)]
    assert small.llm_engine.scheduler.num_preemptions > 0
    assert preempted == batched


@pytest.mark.slow
def test_smollm2_chat_answers():
    llm = LLM("smollm2-135m-instruct", max_model_len=512)
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)[0].outputs[0]
    assert "Paris" in out.text
    assert out.finish_reason in ("stop", "length")
