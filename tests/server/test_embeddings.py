"""POST /v1/embeddings: LAST pooling + L2 normalisation (vLLM's default pooler for decoder-only models),
checked against transformers' own forward pass, in OpenAI's response shape (float and base64)."""
from __future__ import annotations

import base64

import numpy as np
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.server.conftest import MODEL

TEXTS = ["The quick brown fox", "Full fathom five thy father lies"]


def hf_embeddings(model_dir, texts: list[str]) -> dict[str, np.ndarray]:
    """transformers' final-layer hidden state (after the final norm) of each text's last token, normalised."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    result = {}
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer.encode(text)])
            last = model(ids, output_hidden_states=True).hidden_states[-1][0, -1].numpy()
            result[text] = last / np.linalg.norm(last)
    return result


@pytest.fixture(scope="module")
def reference(tiny_llama_dir) -> dict[str, np.ndarray]:
    return hf_embeddings(tiny_llama_dir, TEXTS)


def _embed(client, **body) -> dict:
    resp = client.post("/v1/embeddings", json={"model": MODEL, **body})
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_embeddings_match_transformers(client, reference):
    out = _embed(client, input=TEXTS)
    assert out["object"] == "list" and out["model"] == MODEL
    assert [d["index"] for d in out["data"]] == [0, 1] and all(d["object"] == "embedding" for d in out["data"])
    for text, item in zip(TEXTS, out["data"]):
        vector = np.array(item["embedding"])
        assert vector.shape == reference[text].shape
        np.testing.assert_allclose(vector, reference[text], atol=2e-3)
        assert abs(np.linalg.norm(vector) - 1) < 1e-6
    tokens = sum(len(client.post("/tokenize", json={"prompt": t}).json()["tokens"]) for t in TEXTS)
    assert out["usage"] == {"prompt_tokens": tokens, "completion_tokens": 0, "total_tokens": tokens}
    ids = client.post("/tokenize", json={"prompt": TEXTS[0]}).json()["tokens"]
    by_ids = _embed(client, input=ids)["data"][0]["embedding"]
    np.testing.assert_allclose(by_ids, out["data"][0]["embedding"], atol=1e-6)


def test_base64_encoding_and_the_openai_sdk(client):
    floats = _embed(client, input=TEXTS[0])["data"][0]["embedding"]
    encoded = _embed(client, input=TEXTS[0], encoding_format="base64")["data"][0]["embedding"]
    np.testing.assert_allclose(np.frombuffer(base64.b64decode(encoded), dtype="<f4"), floats, rtol=1e-6)
    # the SDK asks for base64 unless told otherwise and decodes it itself
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client, max_retries=0)
    resp = sdk.embeddings.create(model=MODEL, input=TEXTS[0])
    np.testing.assert_allclose(resp.data[0].embedding, floats, rtol=1e-6)
    assert resp.usage.prompt_tokens > 0


@pytest.mark.parametrize("extra,param", [
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": [999999]}, "input"),
    ({"input": "x", "dimensions": 3}, "dimensions"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "x", "truncate_prompt_tokens": 2}, "truncate_prompt_tokens"),
])
def test_bad_embedding_requests_are_400(client, extra, param):
    resp = client.post("/v1/embeddings", json={"model": MODEL, **extra})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param


def test_dimensions_equal_to_the_model_size_is_accepted(client, engine):
    size = engine.engine.hf_config.hidden_size
    assert len(_embed(client, input="x", dimensions=size)["data"][0]["embedding"]) == size
