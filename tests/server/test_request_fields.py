"""Request-field policy: a field the server does not implement is a 400 naming it; the fields real
clients send (openai SDK, LangChain, lm-eval) and the documented no-ops are accepted."""
from __future__ import annotations

import openai
import pytest

from tests.server.conftest import MODEL

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
COMPLETION = {"model": MODEL, "prompt": "The quick", "max_tokens": 3}


def _assert_400(resp, param: str) -> None:
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and param in err["message"], err


@pytest.mark.parametrize("path,base", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)])
@pytest.mark.parametrize("field,value", [
    ("use_beam_search", True),            # vLLM extension; no beam search here
    ("length_penalty", 0.5),              # vLLM beam-search knob
    ("truncate_prompt_tokens", 4),        # vLLM extension not implemented
    ("spaces_between_special_tokens", False),
    ("priority", 3),
    ("store", True),                      # OpenAI stored completions: nothing is stored
    ("best_of", 3),                       # re-ranking extra samples is not implemented (best_of == n is)
    ("definitely_not_a_field", 1),
])
def test_unimplemented_field_is_400_naming_it(client, path, base, field, value):
    _assert_400(client.post(path, json={**base, field: value}), field)


def test_unknown_stream_option_is_400(client):
    resp = client.post("/v1/completions", json={**COMPLETION, "stream": True,
                                                 "stream_options": {"include_usage": True, "bogus": True}})
    _assert_400(resp, "stream_options.bogus")      # the full path, as OpenAI's `param` names nested fields


@pytest.mark.parametrize("path,body", [("/tokenize", {"prompt": "hi", "return_token_strs": True}),
                                       ("/detokenize", {"tokens": [5], "bogus": 1})])
def test_tokenizer_routes_reject_unknown_fields(client, path, body):
    _assert_400(client.post(path, json=body), next(k for k in body if k not in ("prompt", "tokens")))


@pytest.mark.parametrize("path,base", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)])
def test_documented_no_ops_are_accepted(client, path, base):
    extra = {"user": "u-1", "safety_identifier": "s-1", "prompt_cache_key": "k", "service_tier": "auto",
             "metadata": {"team": "a"}, "store": False, "use_beam_search": False, "best_of": 1}
    resp = client.post(path, json={**base, **extra, "temperature": 0, "seed": 1})
    assert resp.status_code == 200, resp.text
    plain = client.post(path, json={**base, "temperature": 0, "seed": 1}).json()
    key = "text" if path == "/v1/completions" else "message"
    assert resp.json()["choices"][0][key] == plain["choices"][0][key]


def test_lm_eval_payloads_are_accepted(client):
    # the bodies lm-eval's local-completions / local-chat-completions build
    # (EleutherAI/lm-evaluation-harness lm_eval/models/openai_completions.py, _create_payload)
    loglik = {"model": MODEL, "prompt": ["The quick brown"], "temperature": 0, "max_tokens": 1, "logprobs": 1,
              "seed": 1234, "echo": True}
    generate = {"prompt": ["The quick"], "model": MODEL, "max_tokens": 4, "temperature": 0, "stop": ["\n\n"],
                "seed": 1234}
    chat = {"messages": [{"role": "user", "content": "hi"}], "model": MODEL, "max_tokens": 4, "temperature": 0,
            "stop": ["<|im_end|>"], "seed": 1234}
    for path, body in (("/v1/completions", loglik), ("/v1/completions", generate), ("/v1/chat/completions", chat)):
        assert client.post(path, json=body).status_code == 200, (path, body)


def test_openai_sdk_and_langchain_requests_are_accepted(client):
    # TestClient is an httpx.Client, so the real SDKs build and send their own bodies
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client, max_retries=0)
    resp = sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       max_completion_tokens=3, user="u", store=False, metadata={"a": "b"},
                                       service_tier="auto", prompt_cache_key="k")
    assert resp.choices[0].message.content is not None
    from langchain_openai import ChatOpenAI
    llm = ChatOpenAI(model=MODEL, base_url="http://testserver/v1", api_key="x", http_client=client,
                     max_tokens=3, temperature=0, max_retries=0)
    assert isinstance(llm.invoke("hi").content, str)
    chunks = list(llm.stream("hi", stream_usage=True))
    assert sum(c.usage_metadata["output_tokens"] for c in chunks if c.usage_metadata) == 3
