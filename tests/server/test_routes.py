"""GET /tokenizer_info (vLLM's shape, read by lm-eval's RemoteTokenizer) and GET /v1/models/{model_id}."""
from __future__ import annotations

import jinja2
import openai
import pytest

from tests.server.conftest import MODEL


def test_tokenizer_info_serves_what_lm_eval_reads(client, engine):
    # lm-eval (lm_eval/utils.py check_remote_tokenizer_support / RemoteTokenizer) needs a dict with
    # "eos_token", then takes eos_token_id = /tokenize(eos_token, add_special_tokens=False)[0] and renders
    # "chat_template" itself with jinja
    resp = client.get("/tokenizer_info")
    assert resp.status_code == 200
    info = resp.json()
    tokenizer = engine.engine.tokenizer
    assert info["tokenizer_class"] == type(tokenizer).__name__
    assert (info["eos_token"], info["bos_token"]) == (tokenizer.eos_token, tokenizer.bos_token)
    ids = client.post("/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}).json()["tokens"]
    assert ids[0] == tokenizer.eos_token_id
    messages = [{"role": "user", "content": "hi"}]
    rendered = jinja2.Environment().from_string(info["chat_template"]).render(messages=messages,
                                                                               add_generation_prompt=True)
    served = client.post("/tokenize", json={"messages": messages}).json()["tokens"]
    assert tokenizer.encode(rendered, add_special_tokens=False) == served


@pytest.mark.parametrize("model_id", [MODEL])
def test_models_retrieve(client, model_id):
    card = client.get(f"/v1/models/{model_id}").json()
    assert card == client.get("/v1/models").json()["data"][0] and card["object"] == "model"


@pytest.mark.parametrize("model_id", ["nope", "org/nope-7b"])   # ids with '/' reach the route too
def test_models_retrieve_unknown_is_404(client, model_id):
    resp = client.get(f"/v1/models/{model_id}")
    assert resp.status_code == 404
    err = resp.json()["error"]
    assert err["param"] == "model" and model_id in err["message"] and err["code"] == 404


def test_models_retrieve_with_the_openai_sdk(client, tiny_llama_dir):
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client, max_retries=0)
    model = sdk.models.retrieve(MODEL)
    assert model.id == MODEL and model.object == "model"
    assert sdk.models.retrieve(str(tiny_llama_dir)).id == MODEL     # the model path is an alias, '/' included
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("org/unknown-model")
