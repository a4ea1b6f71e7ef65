"""POST /v1/completions: responses, streaming, n, stop, seed, logprobs, echo, usage."""
from __future__ import annotations

from tests.server.conftest import MODEL, stream_events

GREEDY = {"model": MODEL, "temperature": 0.0, "ignore_eos": True}


def test_completion_shape_and_usage(client, engine):
    body = {**GREEDY, "prompt": "The quick brown fox", "max_tokens": 7}
    data = client.post("/v1/completions", json=body).json()
    assert data["object"] == "text_completion" and data["model"] == MODEL and data["id"].startswith("cmpl-")
    choice = data["choices"][0]
    assert choice["finish_reason"] == "length" and choice["index"] == 0
    prompt_len = len(engine.engine.tokenizer.encode("The quick brown fox"))
    assert data["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": 7, "total_tokens": prompt_len + 7}


def test_greedy_matches_offline_engine(client, tiny_llama_dir):
    from ascend_llm.sampling_params import SamplingParams
    from tests.server.conftest import make_engine
    offline = make_engine(tiny_llama_dir)
    offline.add_request("x", "Full fathom five", SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    while offline.has_unfinished_requests():
        outs = offline.step()
    expected = outs[0].outputs[0].text
    data = client.post("/v1/completions", json={**GREEDY, "prompt": "Full fathom five", "max_tokens": 8}).json()
    assert data["choices"][0]["text"] == expected


def test_stream_concatenates_to_non_stream_text(client):
    body = {**GREEDY, "prompt": "We are such stuff", "max_tokens": 12}
    full = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    events = stream_events(client, "/v1/completions", {**body, "stream": True,
                                                       "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == full
    assert [c["choices"][0].get("finish_reason") for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12


def test_stream_without_usage_has_no_usage_chunk(client):
    events = stream_events(client, "/v1/completions", {**GREEDY, "prompt": "The", "max_tokens": 3, "stream": True})
    assert all(e["choices"] and "usage" not in e for e in events[:-1])


def test_n_and_batch_prompts_indexes(client):
    body = {**GREEDY, "prompt": ["The quick", "We are"], "n": 2, "max_tokens": 4}
    data = client.post("/v1/completions", json=body).json()
    assert sorted(c["index"] for c in data["choices"]) == [0, 1, 2, 3]
    assert data["usage"]["completion_tokens"] == 16
    by_index = {c["index"]: c["text"] for c in data["choices"]}
    assert by_index[0] == by_index[1] and by_index[2] == by_index[3]   # greedy: n copies agree


def test_token_id_prompt(client, engine):
    ids = engine.engine.tokenizer.encode("The quick brown fox")
    by_ids = client.post("/v1/completions", json={**GREEDY, "prompt": ids, "max_tokens": 5}).json()
    by_text = client.post("/v1/completions", json={**GREEDY, "prompt": "The quick brown fox",
                                                   "max_tokens": 5}).json()
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
    assert by_ids["usage"]["prompt_tokens"] == len(ids)


def test_seed_makes_sampling_reproducible(client):
    body = {"model": MODEL, "prompt": "The quick", "max_tokens": 10, "temperature": 1.0, "seed": 1234,
            "ignore_eos": True}
    first = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    second = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    other = client.post("/v1/completions", json={**body, "seed": 99}).json()["choices"][0]["text"]
    assert first == second
    assert other != first


def test_stop_string_truncates(client):
    body = {**GREEDY, "prompt": "The quick brown fox", "max_tokens": 12}
    full = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    stop = full[3:5]
    data = client.post("/v1/completions", json={**body, "stop": [stop]}).json()["choices"][0]
    assert data["finish_reason"] == "stop" and data["stop_reason"] == stop
    assert data["text"] == full[:full.index(stop)]
    streamed = stream_events(client, "/v1/completions", {**body, "stop": [stop], "stream": True})
    assert "".join(e["choices"][0]["text"] for e in streamed[:-1]) == data["text"]


def _offline_token_ids(model_dir, prompt: str, max_tokens: int) -> list[int]:
    from ascend_llm.sampling_params import SamplingParams
    from tests.server.conftest import make_engine
    offline = make_engine(model_dir)
    offline.add_request("x", prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    while offline.has_unfinished_requests():
        outs = offline.step()
    return outs[0].outputs[0].token_ids


def test_stop_token_ids_and_min_tokens(client, tiny_llama_dir):
    ids = _offline_token_ids(tiny_llama_dir, "The quick brown fox", 8)
    body = {**GREEDY, "prompt": "The quick brown fox", "max_tokens": 8}
    data = client.post("/v1/completions", json={**body, "stop_token_ids": [ids[3]]}).json()
    assert data["choices"][0]["finish_reason"] == "stop" and data["choices"][0]["stop_reason"] == ids[3]
    assert data["usage"]["completion_tokens"] == ids.index(ids[3]) + 1
    held = client.post("/v1/completions", json={**body, "stop_token_ids": [ids[0]], "min_tokens": 3}).json()
    assert held["usage"]["completion_tokens"] >= 3


def test_logprobs_format(client):
    data = client.post("/v1/completions", json={**GREEDY, "prompt": "The quick", "max_tokens": 4,
                                                "logprobs": 3}).json()
    lp = data["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 4
    assert all(v <= 0 for v in lp["token_logprobs"])
    assert all(1 <= len(top) <= 4 for top in lp["top_logprobs"])
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    # greedy: the sampled token is the most likely one
    for token, token_lp, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert top[token] == token_lp and token_lp >= max(top.values()) - 1e-6


def test_stream_logprobs(client):
    events = stream_events(client, "/v1/completions", {**GREEDY, "prompt": "The quick", "max_tokens": 4,
                                                       "logprobs": 1, "stream": True})
    tokens = [t for e in events[:-1] for t in e["choices"][0]["logprobs"]["tokens"]]
    assert len(tokens) == 4


def test_echo_prepends_prompt(client):
    data = client.post("/v1/completions", json={**GREEDY, "prompt": "The quick", "max_tokens": 3,
                                                "echo": True}).json()
    plain = client.post("/v1/completions", json={**GREEDY, "prompt": "The quick", "max_tokens": 3}).json()
    assert data["choices"][0]["text"] == "The quick" + plain["choices"][0]["text"]
    events = stream_events(client, "/v1/completions", {**GREEDY, "prompt": "The quick", "max_tokens": 3,
                                                       "echo": True, "stream": True})
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == data["choices"][0]["text"]


def test_stream_keeps_unicode_line_separators_inside_one_data_line(client):
    """U+2028 / U+2029 / NEL are valid raw inside JSON, but httpx's `iter_lines` (and any client
    splitting with str.splitlines) breaks lines there: the soak saw a JSONDecodeError from one."""
    prompt = "one\u2028two\u2029three\x85four"
    body = {**GREEDY, "prompt": prompt, "max_tokens": 2, "echo": True}
    text = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    events = stream_events(client, "/v1/completions", {**body, "stream": True})
    assert events[-1] == "[DONE]"
    streamed = "".join(e["choices"][0]["text"] for e in events[:-1])
    assert streamed == text and streamed.startswith(prompt)


def test_max_tokens_defaults_to_16(client):
    data = client.post("/v1/completions", json={**GREEDY, "prompt": "The"}).json()
    assert data["usage"]["completion_tokens"] == 16


def test_penalties_top_k_min_p_accepted(client):
    body = {"model": MODEL, "prompt": "The quick", "max_tokens": 4, "temperature": 0.8, "top_k": 5, "min_p": 0.05,
            "top_p": 0.9, "presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.2, "seed": 3}
    data = client.post("/v1/completions", json=body)
    assert data.status_code == 200 and data.json()["usage"]["completion_tokens"] >= 1


def test_model_omitted_uses_served_model(client):
    data = client.post("/v1/completions", json={"prompt": "The", "max_tokens": 2}).json()
    assert data["model"] == MODEL


def test_echo_with_logprobs_scores_the_prompt(client, engine):
    prompt_ids = engine.engine.tokenizer.encode("The quick brown fox")
    body = {**GREEDY, "prompt": "The quick brown fox", "max_tokens": 3, "echo": True, "logprobs": 2}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(prompt_ids) + 3
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(v is not None and v <= 0 for v in lp["token_logprobs"][1:])
    assert lp["text_offset"] == sorted(lp["text_offset"])
    streamed = stream_events(client, "/v1/completions", {**body, "stream": True})
    tokens = [t for e in streamed[:-1] for t in e["choices"][0]["logprobs"]["tokens"]]
    assert tokens == lp["tokens"]


def test_prompt_logprobs_field(client, engine):
    prompt_ids = engine.engine.tokenizer.encode("The quick brown fox")
    body = {**GREEDY, "prompt": "The quick brown fox", "max_tokens": 2, "prompt_logprobs": 1}
    plp = client.post("/v1/completions", json=body).json()["choices"][0]["prompt_logprobs"]
    assert len(plp) == len(prompt_ids) and plp[0] is None
    for token_id, entry in zip(prompt_ids[1:], plp[1:]):
        assert str(token_id) in entry and entry[str(token_id)]["logprob"] <= 0
        assert any(v["rank"] == 1 for v in entry.values())
