"""Hostile and invalid requests: OpenAI-shaped 4xx naming the parameter, before admission."""
from __future__ import annotations

import json

import pytest

from tests.server.conftest import MODEL

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
COMPLETION = {"model": MODEL, "prompt": "The quick", "max_tokens": 4}


def _post_raw(client, path: str, raw: str | bytes):
    return client.post(path, content=raw, headers={"content-type": "application/json"})


def _assert_error(resp, status: int, param: str | None = None, text: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    if param is not None:
        assert err["param"] == param, err
    if text is not None:
        assert text in err["message"], err
    return err


@pytest.mark.parametrize("field,value,param", [
    ("temperature", "NaN", "temperature"),
    ("temperature", "Infinity", "temperature"),
    ("temperature", "-0.5", "temperature"),
    ("temperature", "2.5", "temperature"),
    ("top_p", "0", "top_p"),
    ("top_p", "1.5", "top_p"),
    ("top_p", "NaN", "top_p"),
    ("n", "0", "n"),
    ("n", "1000000", "n"),
    ("max_tokens", "0", "max_tokens"),
    ("max_tokens", "-3", "max_tokens"),
    ("max_tokens", "100000", "max_tokens"),
    ("top_k", "-5", "top_k"),
    ("min_p", "1.5", "min_p"),
    ("presence_penalty", "3", "presence_penalty"),
    ("frequency_penalty", "-Infinity", "frequency_penalty"),
    ("repetition_penalty", "0", "repetition_penalty"),
    ("min_tokens", "10", "min_tokens"),
    ("logprobs", "21", "logprobs"),
    ("stop", "[\"\"]", "stop"),
    ("stop", json.dumps(["s%d" % i for i in range(17)]), "stop"),
    ("stop", json.dumps("x" * 600), "stop"),
    ("stop_token_ids", "[100000]", "stop_token_ids"),
    ("stream_options", "{\"include_usage\": true}", "stream_options"),
    ("logit_bias", "{\"5\": 101}", "logit_bias"),
    ("logit_bias", "{\"384\": 1}", "logit_bias"),
    ("seed", "1.5", "seed"),
])
def test_completion_param_rejected(client, field, value, param):
    raw = json.dumps(COMPLETION)[:-1] + f', "{field}": {value}}}'
    _assert_error(_post_raw(client, "/v1/completions", raw), 400, param)


@pytest.mark.parametrize("extra,param", [
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"max_completion_tokens": 10_000}, "max_completion_tokens"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0].type"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),   # "auto" needs the flags
    ({"n": -1}, "n"),
])
def test_chat_param_rejected(client, extra, param):
    _assert_error(client.post("/v1/chat/completions", json={**CHAT, **extra}), 400, param)


def test_empty_prompt(client):
    _assert_error(client.post("/v1/completions", json={**COMPLETION, "prompt": ""}), 400, "prompt")
    _assert_error(client.post("/v1/completions", json={**COMPLETION, "prompt": []}), 400, "prompt")
    _assert_error(client.post("/v1/completions", json={**COMPLETION, "prompt": [[]]}), 400, "prompt")
    _assert_error(client.post("/v1/completions", json={k: v for k, v in COMPLETION.items() if k != "prompt"}),
                  400, "prompt")


@pytest.mark.parametrize("ids", [[384], [-1], [1, 2, 10**12], [True]])
def test_token_ids_outside_vocab(client, ids):
    err = _assert_error(client.post("/v1/completions", json={**COMPLETION, "prompt": ids}), 400, "prompt")
    assert "vocabulary" in err["message"] or "token" in err["message"]


def test_detokenize_outside_vocab(client):
    _assert_error(client.post("/detokenize", json={"tokens": [1, 99999]}), 400, "tokens")


def test_prompt_longer_than_context_states_both_numbers(client, engine):
    prompt = "The quick brown fox jumps over the lazy dog. " * 40
    n = len(engine.engine.tokenizer.encode(prompt))
    assert n > 256
    err = _assert_error(client.post("/v1/completions", json={**COMPLETION, "prompt": prompt}), 400, "prompt")
    assert "256" in err["message"] and str(n) in err["message"]
    chat = {**CHAT, "messages": [{"role": "user", "content": prompt}]}
    err = _assert_error(client.post("/v1/chat/completions", json=chat), 400, "messages")
    assert "256" in err["message"]


def test_prompt_plus_max_tokens_over_context(client):
    err = _assert_error(client.post("/v1/completions", json={**COMPLETION, "max_tokens": 255}), 400, "max_tokens")
    assert "256" in err["message"] and "255" in err["message"]


def test_prompt_logprobs_capped(client):
    _assert_error(client.post("/v1/completions", json={**COMPLETION, "prompt_logprobs": 21}), 400, "prompt_logprobs")
    _assert_error(client.post("/v1/completions", json={**COMPLETION, "prompt_logprobs": -1}), 400, "prompt_logprobs")


@pytest.mark.parametrize("raw", [b"{", b"", b"[1, 2]", b'"just a string"', b"\xff\xfe{}", b"{'single': 1}",
                                 b'{"prompt": "x",}'])
def test_malformed_json(client, raw):
    _assert_error(_post_raw(client, "/v1/completions", raw), 400)


def test_deeply_nested_json(client):
    for depth in (40, 100_000):
        raw = '{"model": "tiny", "prompt": "x", "extra": ' + "[" * depth + "]" * depth + "}"
        _assert_error(_post_raw(client, "/v1/completions", raw), 400, text="nested")


def test_body_over_limit_is_413(client):
    big = {**COMPLETION, "prompt": "a" * (5 * 1024 * 1024)}
    _assert_error(client.post("/v1/completions", json=big), 413)

    def chunks():   # no Content-Length: the streamed size is what counts
        yield b'{"prompt": "'
        for _ in range(5):
            yield b"a" * (1024 * 1024)
        yield b'"}'
    _assert_error(client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"}), 413)


def test_unknown_model_is_404(client):
    _assert_error(client.post("/v1/completions", json={**COMPLETION, "model": "gpt-9"}), 404, "model")
    _assert_error(client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-9"}), 404, "model")


def test_unknown_route_and_method_use_openai_shape(client):
    _assert_error(client.get("/v1/nope"), 404)
    _assert_error(client.get("/v1/completions"), 405)


def test_server_still_serves_after_bad_requests(client):
    for _ in range(3):
        client.post("/v1/completions", json={**COMPLETION, "max_tokens": 10**9})
    assert client.post("/v1/completions", json=COMPLETION).status_code == 200
    assert client.get("/health").status_code == 200
