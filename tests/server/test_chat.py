"""POST /v1/chat/completions: template, streaming, logprobs, max_completion_tokens, usage."""
from __future__ import annotations

from tests.server.conftest import MODEL, stream_events

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The quick brown fox"}]
GREEDY = {"model": MODEL, "temperature": 0.0, "ignore_eos": True, "messages": MESSAGES}


def test_chat_uses_template_and_reports_usage(client, engine):
    data = client.post("/v1/chat/completions", json={**GREEDY, "max_tokens": 6}).json()
    assert data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-")
    choice = data["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] == "length"
    tok = engine.engine.tokenizer
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    prompt_len = len(tok.encode(text, add_special_tokens=False))
    assert data["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": 6, "total_tokens": prompt_len + 6}
    tokenized = client.post("/tokenize", json={"messages": MESSAGES}).json()
    assert tokenized["count"] == prompt_len


def test_max_completion_tokens_wins(client):
    data = client.post("/v1/chat/completions", json={**GREEDY, "max_tokens": 9, "max_completion_tokens": 3}).json()
    assert data["usage"]["completion_tokens"] == 3


def test_chat_stream_matches_non_stream(client):
    body = {**GREEDY, "max_tokens": 10}
    full = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    events = stream_events(client, "/v1/chat/completions", {**body, "stream": True,
                                                            "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == full
    finishes = [c["choices"][0].get("finish_reason") for c in chunks if c["choices"]]
    assert finishes[-1] == "length" and finishes.count("length") == 1
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 10


def test_chat_n_choices(client):
    data = client.post("/v1/chat/completions", json={**GREEDY, "max_tokens": 3, "n": 3}).json()
    assert [c["index"] for c in data["choices"]] == [0, 1, 2]
    assert data["usage"]["completion_tokens"] == 9


def test_chat_logprobs(client):
    data = client.post("/v1/chat/completions", json={**GREEDY, "max_tokens": 4, "logprobs": True,
                                                     "top_logprobs": 3}).json()
    content = data["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for entry in content:
        assert entry["logprob"] <= 0 and entry["bytes"] == list(entry["token"].encode())
        assert len(entry["top_logprobs"]) == 3
        top = [t["logprob"] for t in entry["top_logprobs"]]
        assert top == sorted(top, reverse=True)
        assert abs(entry["logprob"] - top[0]) < 1e-5      # greedy picks the most likely token
    plain = client.post("/v1/chat/completions", json={**GREEDY, "max_tokens": 2}).json()
    assert plain["choices"][0].get("logprobs") is None


def test_chat_stream_logprobs(client):
    events = stream_events(client, "/v1/chat/completions", {**GREEDY, "max_tokens": 4, "logprobs": True,
                                                            "stream": True})
    entries = [e for c in events[1:-1] if c["choices"] and c["choices"][0].get("logprobs")
               for e in c["choices"][0]["logprobs"]["content"]]
    assert len(entries) == 4


def test_content_parts_equal_plain_content(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "The quick "}, {"type": "text", "text": "brown fox"}]}]
    plain = [{"role": "user", "content": "The quick brown fox"}]
    a = client.post("/v1/chat/completions", json={**GREEDY, "messages": parts, "max_tokens": 4}).json()
    b = client.post("/v1/chat/completions", json={**GREEDY, "messages": plain, "max_tokens": 4}).json()
    assert a["choices"][0]["message"] == b["choices"][0]["message"]
    assert a["usage"] == b["usage"]


def test_default_max_tokens_fills_context(client):
    data = client.post("/v1/chat/completions", json={**GREEDY, "messages": MESSAGES}).json()
    usage = data["usage"]
    assert usage["total_tokens"] == 256 and data["choices"][0]["finish_reason"] == "length"
