"""End to end on tiny random models: batching, chunking, preemption and prefix caching never
change greedy output; sampling controls; bad input gives clear errors."""
from __future__ import annotations

import json
import shutil

import pytest

from ascend_llm import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def mixed_prompts(llm: LLM, n: int = 16) -> list[list[int]]:
    """n prompts of different lengths (3..48 tokens) with distinct content."""
    vocab = llm.llm_engine.vocab_size
    return [[(7 * i + 13 * j) % (vocab - 3) + 3 for j in range(3 + (i * 11) % 46)] for i in range(n)]


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def llm(tiny_llama_dir) -> LLM:
    return LLM(str(tiny_llama_dir), max_model_len=256)


@pytest.fixture(scope="module")
def alone(llm) -> list[list[int]]:
    """Reference: every prompt run on its own."""
    prompts = mixed_prompts(llm)
    return [token_ids(llm.generate(prompt_token_ids=[p], sampling_params=GREEDY, use_tqdm=False))[0]
            for p in prompts]


def test_batch_of_16_matches_alone(llm, alone):
    batched = llm.generate(prompt_token_ids=mixed_prompts(llm), sampling_params=GREEDY, use_tqdm=False)
    assert token_ids(batched) == alone
    assert all(len(t) == 12 for t in alone)


@pytest.mark.parametrize("overrides", [
    {"num_gpu_blocks_override": 20, "block_size": 16},                 # forces preemption
    {"max_num_batched_tokens": 7, "block_size": 8},                    # chunked prefill everywhere
    {"max_num_seqs": 3, "enable_prefix_caching": False},
])
def test_preemption_and_chunking_do_not_change_greedy_output(tiny_llama_dir, alone, overrides):
    llm = LLM(str(tiny_llama_dir), max_model_len=256, **overrides)
    outs = llm.generate(prompt_token_ids=mixed_prompts(llm), sampling_params=GREEDY, use_tqdm=False)
    assert token_ids(outs) == alone
    if "num_gpu_blocks_override" in overrides:
        assert llm.llm_engine.scheduler.num_preemptions > 0


def test_prefix_cache_hit_gives_same_output(llm):
    prompt = list(range(5, 60))
    first = llm.generate(prompt_token_ids=[prompt], sampling_params=GREEDY, use_tqdm=False)[0]
    second = llm.generate(prompt_token_ids=[prompt], sampling_params=GREEDY, use_tqdm=False)[0]
    assert second.num_cached_tokens >= 48          # three full 16-token blocks reused
    assert second.outputs[0].token_ids == first.outputs[0].token_ids


def test_engine_frees_every_block_when_idle(llm):
    llm.generate(prompt_token_ids=mixed_prompts(llm, 4), sampling_params=GREEDY, use_tqdm=False)
    bm = llm.llm_engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert not llm.llm_engine.has_unfinished_requests()


def test_stop_string_truncates_text(llm):
    prompt = "The quick brown fox"
    full = llm.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0]
    stop = full.text[4:6]
    assert stop and stop in full.text
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full.text[:full.text.index(stop)]


def test_stop_token_ids_and_min_tokens(llm):
    full = llm.generate("Full fathom five", GREEDY, use_tqdm=False)[0].outputs[0]
    stop_id = full.token_ids[2]
    out = llm.generate("Full fathom five", SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                                         stop_token_ids=[stop_id]), use_tqdm=False)[0].outputs[0]
    first = full.token_ids.index(stop_id)
    assert out.token_ids == full.token_ids[:first + 1] and out.stop_reason == stop_id
    late = llm.generate("Full fathom five", SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                                          stop_token_ids=[stop_id], min_tokens=first + 2),
                        use_tqdm=False)[0].outputs[0]
    assert len(late.token_ids) > first + 1


def test_seeded_sampling_is_reproducible_and_n_outputs_differ(llm):
    params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=10, n=3, seed=1234, ignore_eos=True)
    a = llm.generate("We are such stuff", params, use_tqdm=False)[0]
    b = llm.generate(["Tensor parallel", "We are such stuff"], params, use_tqdm=False)[1]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1
    assert [o.index for o in a.outputs] == [0, 1, 2]


def test_logprobs_are_reported(llm):
    out = llm.generate("The quick", SamplingParams(temperature=0.0, max_tokens=4, logprobs=3), use_tqdm=False)
    comp = out[0].outputs[0]
    assert len(comp.logprobs) == len(comp.token_ids)
    for tok, entry in zip(comp.token_ids, comp.logprobs):
        assert tok in entry and entry[tok].rank == 1 and len(entry) == 3   # greedy token is the top-1
        assert all(lp.logprob <= 0 for lp in entry.values())
    assert comp.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(comp.token_ids, comp.logprobs)))


def test_chat_uses_template(llm):
    out = llm.chat([{"role": "user", "content": "hello"}], SamplingParams(max_tokens=3), use_tqdm=False)[0]
    tok = llm.get_tokenizer()
    assert out.prompt.startswith("<|im_start|>user\nhello<|im_end|>") and out.prompt.endswith("assistant\n")
    assert out.prompt_token_ids == tok.encode(out.prompt, add_special_tokens=False)


def test_metrics_filled(llm):
    out = llm.generate("The quick", SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)[0]
    m = out.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time
    assert m.num_generation_tokens == 3 and m.num_prompt_tokens == len(out.prompt_token_ids)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": -1}, "max_tokens"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
])
def test_invalid_sampling_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_requests_do_not_hurt_the_engine(llm):
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate(prompt_token_ids=[[5] * 300], sampling_params=GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate(prompt_token_ids=[[]], sampling_params=GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate(prompt_token_ids=[[5, 10**6]], sampling_params=GREEDY, use_tqdm=False)
    # a batch with one bad prompt is rejected whole, before anything is queued
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate(prompt_token_ids=[[5, 6, 7], [5] * 300], sampling_params=GREEDY, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    out = llm.generate(prompt_token_ids=[[5, 6, 7]], sampling_params=GREEDY, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 12


def test_nonexistent_model_path(tmp_path):
    with pytest.raises(ValueError, match="local"):
        LLM(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="local"):
        LLM("meta-llama/Llama-2-7b-hf")


def test_directory_without_config(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        LLM(str(tmp_path))


def test_unsupported_architecture(tiny_llama_dir, tmp_path):
    bad = tmp_path / "bad_arch"
    shutil.copytree(tiny_llama_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["architectures"] = ["FooForCausalLM"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="FooForCausalLM"):
        LLM(str(bad))


def test_corrupt_safetensors(tiny_llama_dir, tmp_path):
    bad = tmp_path / "corrupt"
    shutil.copytree(tiny_llama_dir, bad)
    path = bad / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="model.safetensors"):
        LLM(str(bad))


def test_unknown_engine_argument_and_values(tiny_llama_dir):
    with pytest.raises(ValueError, match="max_num_sequences"):
        LLM(str(tiny_llama_dir), max_num_sequences=4)
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(str(tiny_llama_dir), max_model_len=100000)
    with pytest.raises(ValueError, match="quantization"):
        LLM(str(tiny_llama_dir), quantization="int3")
    with pytest.raises(ValueError, match="dtype"):
        LLM(str(tiny_llama_dir), dtype="float64")


def test_prompt_logprobs_match_a_full_forward(llm, tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM
    prompt = list(range(10, 41))
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=2)
    # run twice: the second request must not be served from the prefix cache (it needs all logits)
    for _ in range(2):
        out = llm.generate(prompt_token_ids=[prompt], sampling_params=params, use_tqdm=False)[0]
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        want = hf(torch.tensor([prompt])).logits[0].log_softmax(-1)
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        assert prompt[pos] in entry and len(entry) <= 3
        assert entry[prompt[pos]].logprob == pytest.approx(want[pos - 1, prompt[pos]].item(), abs=1e-4)
        top = int(want[pos - 1].argmax())
        assert entry[top].rank == 1


def test_prompt_logprobs_survive_chunked_prefill(tiny_llama_dir):
    chunked = LLM(str(tiny_llama_dir), max_model_len=256, max_num_batched_tokens=8)
    prompt = list(range(10, 41))
    out = chunked.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(max_tokens=1, prompt_logprobs=0),
                           use_tqdm=False)[0]
    assert len(out.prompt_logprobs) == len(prompt)
    assert all(set(e) == {t} for e, t in zip(out.prompt_logprobs[1:], prompt[1:]))


def test_context_length_follows_the_kv_cache(tiny_llama_dir):
    # the model allows 256 positions; 10 blocks of 16 hold only 160 tokens
    lowered = LLM(str(tiny_llama_dir), num_gpu_blocks_override=10)
    assert lowered.llm_engine.max_model_len == 160
    with pytest.raises(ValueError, match="max_model_len=256 needs 16 KV blocks"):
        LLM(str(tiny_llama_dir), max_model_len=256, num_gpu_blocks_override=10)
