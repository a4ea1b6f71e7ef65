"""Structured outputs against a real server process on the bundled SmolLM2, driven by the clients
people use: the openai SDK's `chat.completions.parse` and LangChain's `with_structured_output`
(json_schema and json_mode; function_calling needs tools). One server for the module."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from pathlib import Path

import openai
import pytest
from pydantic import BaseModel, Field

from tests.server.test_openai_sdk import API_KEY, ROOT, _free_port
from tests.server_process import wait_healthy

pytestmark = pytest.mark.slow
MODEL = "smollm2"


class Kind(str, Enum):
    cat = "cat"
    dog = "dog"
    fish = "fish"


class Pet(BaseModel):
    kind: Kind
    legs: int = Field(ge=0, le=8)


class Home(BaseModel):
    city: str = Field(max_length=16)
    floor: int = Field(ge=0, le=9)


class Person(BaseModel):
    name: str = Field(max_length=16)
    pets: list[Pet] = Field(max_length=2)
    home: Home


class City(BaseModel):
    city: str = Field(max_length=20)
    country: str = Field(max_length=20)


def _schema(model: type[BaseModel]) -> dict:
    """The schema OpenAI's strict mode sends: every property required, no additional properties."""
    return openai.lib._pydantic.to_strict_json_schema(model)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [sys.executable, "-m", "ascend_llm.server.api_server", "--model", "smollm2-135m-instruct",
           "--served-model-name", MODEL, "--max-model-len", "512", "--port", str(port), "--device", "cpu",
           "--kv-cache-memory-gb", "0.1", "--api-key", API_KEY, "--shutdown-timeout", "5"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, log, timeout=180)
        yield base
    finally:
        print(Path(log).read_text(errors="replace")[-5000:])
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def sdk(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0, timeout=300)


def _ask(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def test_sdk_parse_returns_the_pydantic_object(sdk):
    completion = sdk.chat.completions.parse(model=MODEL, messages=_ask("Which city is the capital of France?"),
                                            response_format=City, temperature=0, max_completion_tokens=60)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, City) and choice.message.parsed.city


def test_nested_schema_at_temperature_1_always_validates(sdk):
    """20 samples in one batch (n=16 plain and n=4 streamed, concurrently): nested objects, arrays
    and enums, every one valid."""
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": _schema(Person), "strict": True}}
    args = dict(model=MODEL, messages=_ask("Describe a person with pets as JSON."), response_format=fmt,
                temperature=1.0, max_completion_tokens=120)

    def streamed() -> list[str]:
        texts: dict[int, str] = {}
        for chunk in sdk.chat.completions.create(**args, n=4, seed=12, stream=True):
            for c in chunk.choices:
                texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
        return list(texts.values())

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(streamed)
        resp = sdk.chat.completions.create(**args, n=16, seed=11)
        texts = [c.message.content for c in resp.choices] + pending.result()
    assert [c.finish_reason for c in resp.choices] == ["stop"] * 16
    assert len(texts) == 20
    for text in texts:
        Person.model_validate_json(text)          # raises on any invalid sample


def test_guided_regex_and_choice(sdk):
    regex = r"[A-Z][a-z]{2,8}, [0-9]{4}"
    resp = sdk.completions.create(model=MODEL, prompt="A city and a year:", max_tokens=20, temperature=1.0, seed=3,
                                  n=4, extra_body={"guided_regex": regex})
    assert all(re.fullmatch(regex, c.text) for c in resp.choices), [c.text for c in resp.choices]
    chat = sdk.chat.completions.create(model=MODEL, messages=_ask("Is the sky blue? Answer yes or no."),
                                       max_completion_tokens=5, temperature=1.0, n=4,
                                       extra_body={"guided_choice": ["yes", "no"]})
    assert {c.message.content for c in chat.choices} <= {"yes", "no"}


def test_a_bad_schema_does_not_disturb_a_request_in_flight(sdk):
    regex = "[a-z]{12}"
    stream = sdk.completions.create(model=MODEL, prompt="Letters:", max_tokens=20, temperature=1.0, seed=1,
                                    stream=True, extra_body={"guided_regex": regex})
    chunks = iter(stream)
    text = next(chunks).choices[0].text                   # in flight now
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model=MODEL, messages=_ask("x"), response_format={
            "type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "object", "properties": 3}}})
    assert info.value.body["param"] == "response_format" and "does not compile" in info.value.body["message"]
    text += "".join(c.choices[0].text for c in chunks if c.choices)
    assert re.fullmatch(regex, text), text


@pytest.mark.parametrize("method", ["json_schema", "json_mode"])
def test_langchain_with_structured_output(server, method):
    from langchain_openai import ChatOpenAI
    llm = ChatOpenAI(model=MODEL, base_url=server + "/v1", api_key=API_KEY, temperature=0, max_tokens=60,
                     max_retries=0)
    prompt = "What is the capital of France? Answer as JSON with keys city and country."
    if method == "json_schema":
        result = llm.with_structured_output(City, method="json_schema").invoke(prompt)
        assert isinstance(result, City) and result.city
    else:       # json_object output parsed as JSON: any object is valid
        result = llm.with_structured_output(method="json_mode").invoke(prompt)
        assert isinstance(result, dict)
