"""Speculative decoding end to end: greedy output, penalties, stops and logprobs equal plain
decoding on a tiny random Llama and on SmolLM2; seeded sampling keeps its distribution."""
from __future__ import annotations

import collections

import pytest

from ascend_llm import LLM, SamplingParams

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}


def looping_prompts(vocab: int, n: int = 6) -> list[list[int]]:
    """Prompts with repeats of different periods (so n-gram drafts exist) and lengths."""
    prompts = []
    for i in range(n):
        period = [(11 * i + 5 * j) % (vocab - 3) + 3 for j in range(2 + i % 4)]
        prompts.append((period * 12)[:9 + 5 * i])
    return prompts


@pytest.fixture(scope="module")
def plain(tiny_llama_dir) -> LLM:
    return LLM(str(tiny_llama_dir), max_model_len=256)


@pytest.fixture(scope="module")
def spec(tiny_llama_dir) -> LLM:
    return LLM(str(tiny_llama_dir), max_model_len=256, speculative_config=NGRAM)


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def spec_counts(llm: LLM) -> tuple[int, int]:
    stats = llm.llm_engine.stats()
    return stats["spec_decode_num_draft_tokens"], stats["spec_decode_num_accepted_tokens"]


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
    SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, repetition_penalty=1.05,
                   frequency_penalty=0.05, presence_penalty=0.05),
    SamplingParams(temperature=0.0, max_tokens=24, min_tokens=10, logprobs=3),
], ids=["greedy", "penalties", "min_tokens_logprobs"])
def test_greedy_speculation_changes_nothing(plain, spec, params):
    prompts = looping_prompts(plain.llm_engine.vocab_size)
    drafts_before, accepted_before = spec_counts(spec)
    want, got = run(plain, prompts, params), run(spec, prompts, params)
    drafts, accepted = (a - b for a, b in zip(spec_counts(spec), (drafts_before, accepted_before)))
    assert drafts > 0 and 0 < accepted < drafts           # drafts were both accepted and rejected
    for w, g in zip(want, got):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert g.outputs[0].text == w.outputs[0].text
        assert g.outputs[0].finish_reason == w.outputs[0].finish_reason
        if params.logprobs is not None:
            for lw, lg in zip(w.outputs[0].logprobs, g.outputs[0].logprobs):
                assert lw.keys() == lg.keys()
                assert all(abs(lw[t].logprob - lg[t].logprob) < 1e-4 for t in lw)


def test_stop_string_inside_an_accepted_run(plain, spec):
    prompts = looping_prompts(plain.llm_engine.vocab_size)
    base = run(plain, prompts, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    for prompt, out in zip(prompts, base):
        text = out.outputs[0].text
        if len(text) < 12:
            continue
        stop = text[8:12]
        params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop])
        (w,), (g,) = run(plain, [prompt], params), run(spec, [prompt], params)
        assert (g.outputs[0].text, g.outputs[0].token_ids, g.outputs[0].stop_reason) == \
            (w.outputs[0].text, w.outputs[0].token_ids, stop)


def test_seeded_sampling_keeps_the_distribution(plain, spec):
    """Rejection sampling must leave the output distribution unchanged: per output position, the
    token frequencies of 256 seeded samples agree with plain decoding within sampling noise."""
    prompt = looping_prompts(plain.llm_engine.vocab_size)[1]
    params = [SamplingParams(n=128, temperature=0.5, max_tokens=6, ignore_eos=True, seed=seed)
              for seed in (3, 1000)]

    def samples(llm: LLM) -> list[list[int]]:
        outs = llm.generate([{"prompt_token_ids": prompt}] * 2, params, use_tqdm=False)
        return [o.token_ids for out in outs for o in out.outputs]

    drafts_before, accepted_before = spec_counts(spec)
    want, got = samples(plain), samples(spec)
    drafts, accepted = (a - b for a, b in zip(spec_counts(spec), (drafts_before, accepted_before)))
    assert drafts > 0 and 0 < accepted < drafts
    for pos in range(6):
        a = collections.Counter(ids[pos] for ids in want)
        b = collections.Counter(ids[pos] for ids in got)
        total_variation = sum(abs(a[t] - b[t]) for t in a.keys() | b.keys()) / 2 / len(want)
        assert total_variation < 0.15, (pos, a.most_common(4), b.most_common(4))
    assert samples(spec) == got                                           # seeded: reproducible


@pytest.mark.slow
def test_smollm2_greedy_with_ngram_speculation():
    """SmolLM2's greedy continuations of real text, with and without n-gram drafts."""
    from tests.e2e.test_engine_smollm2 import real_prompts
    plain = LLM("smollm2-135m-instruct", max_model_len=512, kv_cache_memory_gb=0.25)
    prompts = real_prompts(plain.get_tokenizer(), 6)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    want = run(plain, prompts, params)
    del plain
    spec = LLM("smollm2-135m-instruct", max_model_len=512, kv_cache_memory_gb=0.25, speculative_config=NGRAM)
    got = run(spec, prompts, params)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    drafts, accepted = spec_counts(spec)
    assert accepted > 0.2 * drafts > 0


@pytest.mark.slow
def test_speculation_under_tensor_parallelism(tiny_llama_dir, plain):
    """Workers receive the draft tokens with the step and compute the same verification rows."""
    prompts = looping_prompts(plain.llm_engine.vocab_size, 3)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    want = run(plain, prompts, params)
    tp = LLM(str(tiny_llama_dir), max_model_len=256, tensor_parallel_size=2, speculative_config=NGRAM)
    try:
        got = run(tp, prompts, params)
        assert spec_counts(tp)[1] > 0
    finally:
        tp.llm_engine.shutdown()
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
