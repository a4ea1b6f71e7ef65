"""vLLM's request extensions (vllm/entrypoints/openai/protocol.py, serving_chat.py, serving_completion.py):
continue_final_message, chat echo, return_tokens_as_token_ids, stream_options.continuous_usage_stats,
and completions echo with max_tokens 0 (the prompt's logprobs only, as legacy OpenAI; lm-eval scores with it)."""
from __future__ import annotations

import re

import pytest

from tests.server.conftest import MODEL, stream_events

CONVERSATION = [{"role": "user", "content": "The quick"}, {"role": "assistant", "content": "brown fox"}]
# the tiny model's template (tests/tiny_models.py) rendered up to the end of the assistant's partial message
OPEN_ENDED = "<|im_start|>user\nThe quick<|im_end|>\n<|im_start|>assistant\nbrown fox"
GREEDY = {"model": MODEL, "temperature": 0, "max_tokens": 5, "ignore_eos": True}


def _chat(client, **body):
    resp = client.post("/v1/chat/completions", json={**GREEDY, **body})
    assert resp.status_code == 200, resp.text
    return resp.json()


def _error_param(resp) -> str:
    assert resp.status_code == 400, resp.text
    return resp.json()["error"]["param"]


def test_continue_final_message_continues_the_last_message(client):
    out = _chat(client, messages=CONVERSATION, continue_final_message=True, add_generation_prompt=False)
    plain = client.post("/v1/completions", json={**GREEDY, "prompt": OPEN_ENDED}).json()
    assert out["choices"][0]["message"]["content"] == plain["choices"][0]["text"]
    assert out["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
    # vLLM: the response role is the last message's when no generation prompt is added
    assert out["choices"][0]["message"]["role"] == "assistant"
    # add_generation_prompt left out: continuing implies no generation prompt
    implied = _chat(client, messages=CONVERSATION, continue_final_message=True)
    assert implied["choices"][0]["message"]["content"] == plain["choices"][0]["text"]


def test_continue_final_message_with_generation_prompt_is_400(client):
    resp = client.post("/v1/chat/completions", json={**GREEDY, "messages": CONVERSATION,
                                                     "continue_final_message": True, "add_generation_prompt": True})
    assert _error_param(resp) == "continue_final_message"
    empty = [CONVERSATION[0], {"role": "assistant", "content": ""}]
    resp = client.post("/v1/chat/completions", json={**GREEDY, "messages": empty, "continue_final_message": True})
    assert _error_param(resp) == "continue_final_message"


def test_chat_echo_prefixes_the_last_message(client):
    body = dict(messages=CONVERSATION, continue_final_message=True)
    plain = _chat(client, **body)["choices"][0]["message"]["content"]
    echoed = _chat(client, **body, echo=True)["choices"][0]["message"]["content"]
    assert echoed == "brown fox" + plain
    events = stream_events(client, "/v1/chat/completions", {**GREEDY, **body, "echo": True, "stream": True})
    streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])
    assert streamed == echoed
    # vLLM echoes only a last message of the response's role: a user turn is not echoed
    user_turn = _chat(client, messages=CONVERSATION[:1], echo=True)["choices"][0]["message"]["content"]
    assert user_turn == _chat(client, messages=CONVERSATION[:1])["choices"][0]["message"]["content"]


def _detokenize(client, names: list[str]) -> str:
    ids = [int(re.fullmatch(r"token_id:(\d+)", n).group(1)) for n in names]
    return client.post("/detokenize", json={"tokens": ids}).json()["prompt"]


def test_return_tokens_as_token_ids_chat(client):
    out = _chat(client, messages=CONVERSATION[:1], logprobs=True, top_logprobs=2, return_tokens_as_token_ids=True)
    content = out["choices"][0]["logprobs"]["content"]
    assert _detokenize(client, [t["token"] for t in content]) == out["choices"][0]["message"]["content"]
    for t in content:
        assert t["bytes"] == list(t["token"].encode())
        assert all(re.fullmatch(r"token_id:\d+", alt["token"]) for alt in t["top_logprobs"])


def test_return_tokens_as_token_ids_completions(client):
    body = {**GREEDY, "prompt": "The quick", "logprobs": 2, "return_tokens_as_token_ids": True}
    out = client.post("/v1/completions", json=body).json()["choices"][0]
    plain = client.post("/v1/completions", json={**body, "return_tokens_as_token_ids": False}).json()["choices"][0]
    assert _detokenize(client, out["logprobs"]["tokens"]) == out["text"]
    assert all(re.fullmatch(r"token_id:\d+", k) for top in out["logprobs"]["top_logprobs"] for k in top)
    assert out["logprobs"]["token_logprobs"] == plain["logprobs"]["token_logprobs"]
    assert out["logprobs"]["text_offset"] == plain["logprobs"]["text_offset"]   # offsets still count text


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "The quick", "n": 2}),
    ("/v1/chat/completions", {"messages": CONVERSATION[:1], "n": 2}),
])
def test_continuous_usage_stats_on_every_chunk(client, path, body):
    events = stream_events(client, path, {**GREEDY, **body, "stream": True,
                                          "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    chunks = [e for e in events if e != "[DONE]"]
    assert all("usage" in e for e in chunks), chunks
    final = chunks[-1]["usage"]
    assert final["completion_tokens"] == 2 * GREEDY["max_tokens"] and chunks[-1]["choices"] == []
    for e in chunks[:-1]:
        u = e["usage"]
        assert u["prompt_tokens"] == final["prompt_tokens"] and u["total_tokens"] == u["prompt_tokens"] + \
            u["completion_tokens"] <= final["total_tokens"]
    plain = stream_events(client, path, {**GREEDY, **body, "stream": True})
    assert all("usage" not in e for e in plain[:-2])


def test_echo_with_max_tokens_0_returns_the_prompt_logprobs(client):
    prompt = "The quick brown fox"
    n_prompt = client.post("/tokenize", json={"prompt": prompt}).json()["count"]
    body = {"model": MODEL, "prompt": prompt, "echo": True, "max_tokens": 0, "logprobs": 1, "temperature": 0}
    out = client.post("/v1/completions", json=body).json()
    choice = out["choices"][0]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == n_prompt and lp["token_logprobs"][0] is None
    assert all(isinstance(x, float) and x <= 0 for x in lp["token_logprobs"][1:])
    assert out["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 0, "total_tokens": n_prompt}
    # the same prompt scores as the echo + max_tokens 1 path lm-eval uses
    one = client.post("/v1/completions", json={**body, "max_tokens": 1}).json()["choices"][0]["logprobs"]
    assert one["token_logprobs"][:n_prompt] == pytest.approx(lp["token_logprobs"])
    events = stream_events(client, "/v1/completions", {**body, "stream": True})
    streamed = [e["choices"][0] for e in events if e != "[DONE]" and e["choices"]]
    assert "".join(c["text"] for c in streamed) == prompt
    assert sum(len(c["logprobs"]["tokens"]) for c in streamed) == n_prompt


def test_max_tokens_0_without_echo_is_still_400(client):
    resp = client.post("/v1/completions", json={"model": MODEL, "prompt": "The quick", "max_tokens": 0})
    assert _error_param(resp) == "max_tokens"


def test_return_tokens_as_token_ids_server_default(client, engine, tiny_llama_dir):
    from fastapi.testclient import TestClient

    from ascend_llm.server.app import build_app
    from tests.server.conftest import server_args
    # the engine is already running (the module client started it): no second lifespan
    other = TestClient(build_app(engine, server_args(tiny_llama_dir, "--return-tokens-as-token-ids")))
    body = {**GREEDY, "prompt": "The quick", "logprobs": 1}
    tokens = other.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]["tokens"]
    assert all(re.fullmatch(r"token_id:\d+", t) for t in tokens)
    override = other.post("/v1/completions", json={**body, "return_tokens_as_token_ids": False}).json()
    assert override["choices"][0]["logprobs"]["tokens"] == \
        client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]["tokens"]
