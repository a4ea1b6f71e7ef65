"""A real `python -m ascend_llm.server.api_server` process, driven by the official openai SDK; then SIGTERM."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest

from tests.server.conftest import MODEL
from tests.server_process import wait_healthy

API_KEY = "test-key"
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [sys.executable, "-m", "ascend_llm.server.api_server", "--model", str(tiny_llama_dir),
           "--served-model-name", MODEL, "--max-model-len", "256", "--port", str(port), "--device", "cpu",
           "--kv-cache-memory-gb", "0.05", "--api-key", API_KEY, "--shutdown-timeout", "20"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, log, timeout=90)
        yield {"base": base, "proc": proc, "log": log}
    finally:
        print(log.read_text(errors="replace")[-5000:])   # shown by pytest when a test failed
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def sdk(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def test_startup_log_lists_endpoints(server):
    text = server["log"].read_text()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/tokenize"):
        assert f"{server['base']}{path}" in text, text


def test_models(sdk):
    assert [m.id for m in sdk.models.list().data] == [MODEL]


def test_completions(sdk):
    resp = sdk.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert resp.choices[0].finish_reason == "length" and resp.usage.completion_tokens == 6
    chunks = list(sdk.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=6, temperature=0,
                                         stream=True, stream_options={"include_usage": True},
                                         extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == resp.choices[0].text
    assert chunks[-1].usage.completion_tokens == 6


def test_chat(sdk):
    messages = [{"role": "user", "content": "The quick brown fox"}]
    resp = sdk.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=5, temperature=0,
                                       logprobs=True, top_logprobs=2, seed=7, extra_body={"ignore_eos": True})
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and len(choice.logprobs.content) == 5
    assert len(choice.logprobs.content[0].top_logprobs) == 2
    stream = sdk.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=5, temperature=0,
                                         stream=True, stream_options={"include_usage": True},
                                         extra_body={"ignore_eos": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert chunks[-1].usage.total_tokens == resp.usage.total_tokens


def test_sdk_errors(server, sdk):
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.completions.create(model=MODEL, prompt="x", max_tokens=4, temperature=-1)
    assert bad.value.status_code == 400 and bad.value.param == "temperature"
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    anonymous = openai.OpenAI(base_url=server["base"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()
    assert httpx.get(server["base"] + "/health").status_code == 200


def test_models_retrieve_and_echo_scoring(server, sdk):
    assert sdk.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("org/unknown-model")
    # legacy scoring: echo + max_tokens 0 returns the prompt and its logprobs, nothing generated
    resp = sdk.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=0, echo=True, logprobs=1)
    choice = resp.choices[0]
    assert choice.text == "The quick brown fox" and resp.usage.completion_tokens == 0
    assert choice.logprobs.token_logprobs[0] is None and len(choice.logprobs.tokens) == resp.usage.prompt_tokens
    extra = {"bogus_field": 1}
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.completions.create(model=MODEL, prompt="x", max_tokens=1, extra_body=extra)
    assert bad.value.param == "bogus_field"


def test_sigterm_drains_in_flight_stream_then_exits_cleanly(server, sdk):
    """Must run last in this module: it stops the shared server."""
    proc: subprocess.Popen = server["proc"]
    received: list = []
    started = threading.Event()

    def stream_long():
        for chunk in sdk.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=200,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True}):
            received.append(chunk)
            started.set()

    worker = threading.Thread(target=stream_long)
    worker.start()
    assert started.wait(30)
    proc.send_signal(signal.SIGTERM)
    at_signal = len(received)
    worker.join(60)
    assert not worker.is_alive()
    assert len(received) > at_signal     # the stream kept going after SIGTERM
    assert received[-1].choices[0].finish_reason == "length"
    assert proc.wait(30) == 0
    with pytest.raises(httpx.HTTPError):
        httpx.get(server["base"] + "/health", timeout=2)
    assert "draining" in server["log"].read_text()
