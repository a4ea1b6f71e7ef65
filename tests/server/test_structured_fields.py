"""Request fields that constrain the output (response_format, structured_outputs, guided_*,
logit_bias, allowed_token_ids) on both endpoints, through the app on the tiny model.

The tiny model's weights are random: outputs are valid only because of the grammar.
"""
from __future__ import annotations

import json
import re
import threading

import pytest

from tests.server.conftest import MODEL, stream_events

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 160}
COMPLETION = {"model": MODEL, "prompt": "The quick", "max_tokens": 160}
SCHEMA = {"type": "object", "properties": {"colour": {"enum": ["red", "green"]},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["colour", "n"], "additionalProperties": False}


def _error(resp, param: str, text: str | None = None) -> dict:
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and err["code"] == 400, err
    assert text is None or text in err["message"], err
    return err


def _check_doc(text: str) -> None:
    doc = json.loads(text)
    assert doc["colour"] in ("red", "green") and 0 <= doc["n"] <= 99 and set(doc) == {"colour", "n"}


def test_chat_response_format_json_schema(client):
    body = {**CHAT, "n": 3, "temperature": 1.0, "seed": 2,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}}
    data = client.post("/v1/chat/completions", json=body).json()
    for choice in data["choices"]:
        _check_doc(choice["message"]["content"])
        assert choice["finish_reason"] == "stop"


def test_chat_json_schema_streamed(client):
    events = stream_events(client, "/v1/chat/completions",
                           {**CHAT, "stream": True, "temperature": 1.0, "seed": 4,
                            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}},
                            "structured_outputs": None})
    chunks = [e for e in events if e != "[DONE]"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    _check_doc(text)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("extra, check", [
    ({"guided_regex": r"[ab]{2}\d"}, lambda t: re.fullmatch(r"[ab]{2}\d", t)),
    ({"guided_choice": ["fox", "dog"]}, lambda t: t in ("fox", "dog")),
    ({"guided_json": json.dumps(SCHEMA)}, lambda t: _check_doc(t) or True),
    ({"guided_grammar": 'root ::= "x" [0-9]', "guided_decoding_backend": "xgrammar"},
     lambda t: re.fullmatch(r"x[0-9]", t)),
    ({"structured_outputs": {"regex": "[0-9]{3}"}}, lambda t: re.fullmatch("[0-9]{3}", t)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}},
     lambda t: _check_doc(t) or True),
])
def test_completion_structured_fields(client, extra, check):
    data = client.post("/v1/completions", json={**COMPLETION, "temperature": 1.0, "seed": 9, **extra}).json()
    text = data["choices"][0]["text"]
    assert check(text), text
    assert data["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("path, extra, param, text", [
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}},
     "response_format", "does not compile"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format", "json_schema.schema"),
    ("/v1/completions", {"guided_regex": "(unclosed"}, "guided_regex", "regex does not compile"),
    ("/v1/completions", {"guided_grammar": "root ::= "}, "guided_grammar", "EBNF grammar does not compile"),
    ("/v1/completions", {"guided_choice": []}, "guided_choice", "choice must be"),
    ("/v1/completions", {"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ("/v1/completions", {"structured_outputs": {"json": {}, "regex": "a"}}, "structured_outputs", "exactly one"),
    ("/v1/completions", {"structured_outputs": {"whitespace": 1}}, "structured_outputs", "unknown field"),
    ("/v1/completions", {"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "only one of"),
    ("/v1/completions", {"guided_regex": "a", "guided_decoding_backend": "outlines"}, "guided_decoding_backend",
     "'outlines'"),
    ("/v1/completions", {"guided_whitespace_pattern": " "}, "guided_whitespace_pattern", "not supported"),
    ("/v1/completions", {"logit_bias": {"x": 1}}, "logit_bias", "not an integer"),
    ("/v1/completions", {"logit_bias": {"384": 1}}, "logit_bias", "token id 384 is outside the vocabulary (vocab size 384"),
    ("/v1/chat/completions", {"logit_bias": {"5": -100.5}}, "logit_bias", "[-100, 100]"),
    ("/v1/completions", {"allowed_token_ids": []}, "allowed_token_ids", "non-empty"),
    ("/v1/chat/completions", {"allowed_token_ids": [1, 999]}, "allowed_token_ids", "token id 999"),
])
def test_bad_constraints_are_400s_naming_the_field(client, path, extra, param, text):
    base = CHAT if path.startswith("/v1/chat") else COMPLETION
    _error(client.post(path, json={**base, **extra}), param, text)


def test_logit_bias_and_allowed_token_ids_on_both_endpoints(client, engine):
    body = {**COMPLETION, "max_tokens": 5, "temperature": 1.0, "ignore_eos": True, "logprobs": 0}
    biased = client.post("/v1/completions", json={**body, "logit_bias": {"42": 100}}).json()
    assert biased["choices"][0]["logprobs"]["tokens"] == [engine.engine.tokenizer.decode([42])] * 5
    allowed = engine.engine.tokenizer.convert_tokens_to_ids(["b", "c"])
    chat = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 8, "temperature": 1.0, "ignore_eos": True,
                                                     "allowed_token_ids": allowed}).json()
    assert set(chat["choices"][0]["message"]["content"]) <= {"b", "c"}, chat


def test_response_format_text_is_plain_generation(client):
    body = {**CHAT, "max_tokens": 4, "temperature": 0.0, "ignore_eos": True}
    plain = client.post("/v1/chat/completions", json=body).json()
    text = client.post("/v1/chat/completions", json={**body, "response_format": {"type": "text"}}).json()
    assert text["choices"][0]["message"] == plain["choices"][0]["message"]


def test_grammar_compiles_off_the_engine_loop_and_is_cached(client, engine, monkeypatch):
    compiler = engine.engine.structured_output.compiler
    threads: list[str] = []
    real = compiler._compile

    def recording(spec):
        threads.append(threading.current_thread().name)
        return real(spec)

    monkeypatch.setattr(compiler, "_compile", recording)
    body = {**COMPLETION, "max_tokens": 10, "guided_regex": "[xyz]{3} compiled once", "n": 2}
    for _ in range(2):
        assert client.post("/v1/completions", json=body).status_code == 200
    assert len(threads) == 1 and threads[0] != "ascend-llm-engine", threads   # once, on a worker thread
