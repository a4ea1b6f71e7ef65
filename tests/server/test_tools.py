"""Tool calling on /v1/chat/completions with the tiny model (TestClient): `tools` / `tool_choice`
validation (400 naming the field), tools and tool turns through the chat template, the grammar
constraint of "required" / named choices, and OpenAI's response shapes checked with the openai
SDK's own types (message.tool_calls, delta.tool_calls, finish_reason "tool_calls")."""
from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from ascend_llm.outputs import CompletionOutput, RequestOutput
from ascend_llm.sampling_params import SamplingParams
from ascend_llm.server.app import build_app
from ascend_llm.server.args import ServerConfig, make_parser
from ascend_llm.server.protocol import ChatCompletionRequest
from ascend_llm.server.serving_chat import ChatServing, _Prepared
from ascend_llm.server.serving_engine import PromptInput
from ascend_llm.server.serving_tools import AUTO_NEEDS_FLAGS, resolve_tools
from ascend_llm.server.tool_choice_schema import required_tools_schema
from tests.server.conftest import MODEL, server_args
from tests.server.test_validation import _assert_error
from tests.server.tool_fixtures import TOOL_TEMPLATE

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
NOW = {"type": "function", "function": {"name": "now"}}
USER = [{"role": "user", "content": "hi"}]
BASE = {"model": MODEL, "messages": USER, "max_tokens": 3, "tools": [WEATHER, NOW]}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
TURNS = [{"role": "user", "content": "Weather in Paris?"},
         {"role": "assistant", "content": None, "tool_calls": [CALL]},
         {"role": "tool", "tool_call_id": "call_1", "content": "22 C, sunny"}]


@pytest.fixture(scope="module")
def tool_client(engine, tiny_llama_dir):
    """Auto tool choice with the hermes parser (the tiny model's template ignores tools: short prompts)."""
    args = server_args(tiny_llama_dir, "--enable-auto-tool-choice", "--tool-call-parser", "hermes")
    with TestClient(build_app(engine, args)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def template_client(engine, tiny_llama_dir):
    """An app whose template renders tools (its chat prompts are too long for the tiny model to run)."""
    args = server_args(tiny_llama_dir, "--chat-template", TOOL_TEMPLATE)
    with TestClient(build_app(engine, args)) as test_client:
        yield test_client


def _auto(parser: str) -> ServerConfig:
    return ServerConfig(enable_auto_tool_choice=True, tool_call_parser=parser)


def _prepare(client: TestClient, body: dict[str, Any]) -> _Prepared:
    return client.app.state.handlers.chat.prepare(ChatCompletionRequest(**{**BASE, **body}))


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize("extra,param", [
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tools": [WEATHER, {"type": "function"}]}, "tools[1].function"),
    ({"tools": [{"type": "function", "function": {"name": "my tool"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "x" * 65}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "a string"}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"properties": [1]}}}]},
     "tools[0].function.parameters"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": {"type": "function"}}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": None, "tool_choice": "none"}, "tool_choice"),
    ({"tools": None, "tool_choice": "auto"}, "tool_choice"),
    ({"messages": USER + [{"role": "tool", "content": "x"}]}, "messages[1].tool_call_id"),
    ({"messages": [TURNS[0], {**TURNS[1], "tool_calls": [{**CALL, "function": {"name": "f", "arguments": "{bad"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [CALL]}]}, "messages[0].tool_calls"),
    ({"tools": None, "tool_choice": None, "functions": [WEATHER["function"]]}, "functions"),
    ({"tools": None, "tool_choice": None, "function_call": "auto"}, "function_call"),
])
def test_bad_tool_requests_are_400_naming_the_field(tool_client, extra, param):
    _assert_error(tool_client.post("/v1/chat/completions", json={**BASE, "tool_choice": "none", **extra}), 400, param)


def test_auto_without_the_flags_is_vllms_400(client):
    # vLLM's serving_chat.py: "auto" needs --enable-auto-tool-choice and --tool-call-parser
    for body in ({**BASE, "tool_choice": "auto"}, BASE):       # tools without tool_choice mean "auto"
        _assert_error(client.post("/v1/chat/completions", json=body), 400, "tool_choice", AUTO_NEEDS_FLAGS)


def test_none_works_without_flags(client):
    data = client.post("/v1/chat/completions", json={**BASE, "tool_choice": "none"}).json()
    message = ChatCompletion.model_validate(data).choices[0].message
    assert isinstance(message.content, str) and not message.tool_calls


def test_flags(tiny_llama_dir):
    with pytest.raises(SystemExit):
        make_parser().parse_args(["--tool-call-parser", "unknown"])
    with pytest.raises(ValueError, match="--tool-call-parser"):
        ServerConfig.from_args(server_args(tiny_llama_dir, "--enable-auto-tool-choice"))
    config = ServerConfig.from_args(server_args(tiny_llama_dir, "--enable-auto-tool-choice",
                                                "--tool-call-parser", "llama3_json"))
    assert config.enable_auto_tool_choice and config.tool_call_parser == "llama3_json"


# ------------------------------------------------------------------- the prompt
def test_tools_and_tool_turns_go_through_the_template(template_client):
    template_chat = template_client.app.state.handlers.chat
    req = ChatCompletionRequest(**{**BASE, "messages": TURNS, "tool_choice": "none"})
    tools = resolve_tools(req, ServerConfig())
    prompt = template_chat.render(req.messages, tools=tools.tools).text
    assert json.dumps(WEATHER) in prompt and json.dumps(NOW) in prompt          # tools as transformers passes them
    assert '"arguments": {"city": "Paris"}' in prompt                          # arguments as a dict (vLLM)
    assert '<tool_response id="call_1">\n22 C, sunny' in prompt
    assert "<tools>" not in template_chat.render(req.messages).text
    excluded = ServerConfig(exclude_tools_when_tool_choice_none=True)
    assert resolve_tools(req, excluded).prompt_tools is None          # vLLM's --exclude-tools-when-tool-choice-none
    assert resolve_tools(req.model_copy(update={"tool_choice": "required"}), excluded).prompt_tools == tools.tools


def test_two_turn_conversation_answers(tool_client):
    data = tool_client.post("/v1/chat/completions", json={**BASE, "messages": TURNS, "tool_choice": "auto"}).json()
    assert ChatCompletion.model_validate(data).choices[0].finish_reason in ("stop", "length", "tool_calls")


# ---------------------------------------------------------- sampling parameters
def test_required_and_named_set_the_grammar(tool_client):
    required = _prepare(tool_client, {"tool_choice": "required"}).params.structured_outputs
    assert required.json == required_tools_schema([WEATHER, NOW])
    named = _prepare(tool_client, {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    assert named.params.structured_outputs.json == WEATHER["function"]["parameters"]
    single = _prepare(tool_client, {"tool_choice": "required", "parallel_tool_calls": False})
    assert single.params.structured_outputs.json["maxItems"] == 1
    for choice in ("auto", "none"):
        assert _prepare(tool_client, {"tool_choice": choice}).params.structured_outputs is None


def test_mistral_keeps_its_special_tokens():
    # vLLM's MistralToolParser.adjust_request: [TOOL_CALLS] is a special token
    req = ChatCompletionRequest(**BASE)
    assert resolve_tools(req, _auto("mistral")).keep_special_tokens
    assert not resolve_tools(req, _auto("hermes")).keep_special_tokens


# ------------------------------------------------------------- response shapes
OUTPUT = ('I will check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
          '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>')


class _FakeStream:
    """Cumulative engine outputs of one request, as OutputStream yields them."""

    def __init__(self, texts: list[str], finish_reason: str) -> None:
        self.outputs = [_output(text, finish_reason if i == len(texts) - 1 else None)
                        for i, text in enumerate(texts)]

    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        for out in self.outputs:
            yield 0, out

    def abort(self) -> None:
        pass

    async def collect(self) -> list[RequestOutput]:
        return self.outputs[-1:]


def _output(text: str, finish_reason: str | None) -> RequestOutput:
    return RequestOutput("r-0", "p", [1, 2], None, [CompletionOutput(0, text, list(range(len(text))), None, None,
                                                                     finish_reason)], finish_reason is not None)


def _prepared(client: TestClient, body: dict[str, Any]) -> _Prepared:
    req = ChatCompletionRequest(**{**BASE, **body})
    tools = resolve_tools(req, _auto("hermes"))
    return _Prepared(req, MODEL, PromptInput("p", [1, 2]), SamplingParams(), None, tools=tools)


def _streamed(p: _Prepared, text: str, step: int, finish_reason: str = "stop") -> list[ChatCompletionChunk]:
    pieces = [text[:i] for i in range(step, len(text), step)] + [text]

    async def collect() -> list[str]:
        return [event async for event in ChatServing(None)._stream("chatcmpl-1", p, _FakeStream(pieces, finish_reason))]
    events = asyncio.run(collect())
    assert events[-1] == "data: [DONE]\n\n"
    return [ChatCompletionChunk.model_validate(json.loads(e[len("data: "):])) for e in events[:-1]]


def _accumulate(chunks: list[ChatCompletionChunk]) -> tuple[str, list[dict[str, str]]]:
    content, calls = "", []
    for chunk in chunks:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for d in delta.tool_calls or []:
            if d.index == len(calls):
                assert d.id.startswith("call_") and d.type == "function" and d.function.name
                calls.append({"id": d.id, "name": d.function.name, "arguments": d.function.arguments or ""})
            else:
                assert d.id is None and d.type is None and d.function.name is None
                calls[d.index]["arguments"] += d.function.arguments
    return content, calls


def test_non_streamed_tool_calls_have_openais_shape(tool_client):
    p = _prepared(tool_client, {"tool_choice": "auto"})
    data = ChatServing(None)._response("chatcmpl-1", p, _output(OUTPUT, "stop")).model_dump()
    choice = ChatCompletion.model_validate(data).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "I will check."
    calls = choice.message.tool_calls
    assert [(c.type, c.function.name, c.function.arguments) for c in calls] == [
        ("function", "get_weather", '{"city": "Paris"}'), ("function", "now", "{}")]
    assert all(c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id


@pytest.mark.parametrize("step", [1, 7])
def test_streamed_tool_calls_have_openais_shape(tool_client, step):
    p = _prepared(tool_client, {"tool_choice": "auto", "stream": True})
    chunks = _streamed(p, OUTPUT, step)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks].count("tool_calls") == 1
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    content, calls = _accumulate(chunks)
    assert content == "I will check."
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather", '{"city": "Paris"}'), ("now", "{}")]


def test_no_calls_streams_plain_content(tool_client):
    text = "Hello <b>there</b>"
    chunks = _streamed(_prepared(tool_client, {"tool_choice": "auto", "stream": True}), text, 2)
    assert _accumulate(chunks) == (text, []) and chunks[-1].choices[0].finish_reason == "stop"


def test_named_and_required_outputs_become_calls(tool_client):
    named = _prepared(tool_client, {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    data = ChatServing(None)._response("c", named, _output('{"city": "Paris"}', "stop")).model_dump()
    choice = ChatCompletion.model_validate(data).choices[0]
    assert choice.finish_reason == "stop"           # OpenAI answers "stop" to a named tool_choice
    assert choice.message.tool_calls[0].function.name == "get_weather" and choice.message.content is None
    required = _prepared(tool_client, {"tool_choice": "required", "stream": True})
    chunks = _streamed(required, '[{"name": "now", "parameters": {}}]', 3)
    assert _accumulate(chunks)[1][0]["arguments"] == "{}"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tokenize_renders_tools_like_chat(template_client):
    # vLLM's /tokenize takes `tools` with `messages`
    client = template_client
    plain = client.post("/tokenize", json={"messages": USER}).json()["count"]
    with_tools = client.post("/tokenize", json={"messages": USER, "tools": [NOW]}).json()["count"]
    assert with_tools > plain + 10
    _assert_error(client.post("/tokenize", json={"messages": USER, "tools": [{"type": "x"}]}), 400, "tools[0].type")
    _assert_error(client.post("/tokenize", json={"prompt": "x", "tools": [NOW]}), 400, "tools")


# ------------------------------------------- real clients over scripted model output
@pytest.fixture
def scripted(tool_client, monkeypatch):
    """The tool client with the engine replaced by `texts[key]` for every request, streamed 5
    characters per step: the HTTP layer, the openai SDK and LangChain see real tool-call answers."""
    texts: dict[str, str] = {}

    async def submit(request_id, prompts, params, **_):
        text = texts["output"]
        return _FakeStream([text[:i] for i in range(5, len(text), 5)] + [text], "stop")
    monkeypatch.setattr(tool_client.app.state.handlers.ctx, "submit", submit)
    return texts


def test_openai_sdk_reads_the_tool_calls(tool_client, scripted):
    import openai
    scripted["output"] = OUTPUT
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=tool_client)
    kwargs = dict(model=MODEL, messages=USER, tools=[WEATHER, NOW])
    message = sdk.chat.completions.create(**kwargs).choices[0].message
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("get_weather", {"city": "Paris"}), ("now", {})]
    with sdk.chat.completions.stream(**kwargs) as stream:          # the SDK's own accumulation
        final = stream.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls" and final.message.content == "I will check."
    assert [(c.function.name, c.function.arguments) for c in final.message.tool_calls] == [
        (c.function.name, c.function.arguments) for c in message.tool_calls]


def test_langchain_reads_the_tool_calls(tool_client, scripted):
    from langchain_openai import ChatOpenAI
    scripted["output"] = OUTPUT
    llm = ChatOpenAI(base_url="http://testserver/v1", api_key="unused", model=MODEL, http_client=tool_client,
                     max_retries=0).bind_tools([WEATHER, NOW])
    message = llm.invoke("Weather in Paris?")
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [("get_weather", {"city": "Paris"}), ("now", {})]
    chunks = list(llm.stream("Weather in Paris?"))
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    assert [(c["name"], c["args"]) for c in merged.tool_calls] == [("get_weather", {"city": "Paris"}), ("now", {})]


def test_langchain_structured_output_over_a_named_call(tool_client, scripted):
    # with_structured_output(method="function_calling") names the function in tool_choice; the output
    # the grammar engine would force is the arguments object (here scripted)
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    class Weather(BaseModel):
        """A weather report."""
        city: str
        celsius: int

    scripted["output"] = '{"city": "Paris", "celsius": 18}'
    llm = ChatOpenAI(base_url="http://testserver/v1", api_key="unused", model=MODEL, http_client=tool_client,
                     max_retries=0)
    assert llm.with_structured_output(Weather, method="function_calling").invoke("Paris?") == \
        Weather(city="Paris", celsius=18)
