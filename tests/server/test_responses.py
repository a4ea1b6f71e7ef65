"""POST /v1/responses with the tiny model (TestClient): the response object and the streamed events
checked with the openai SDK's own types, input items / tools through the chat template, the 400s
naming the Responses field, and the event sequence of text and function calls (fed by a fake engine
stream, so the tool-call output is known). Event order: the SDK's `ResponseStreamEvent` union and
vLLM serving_responses.py `_process_simple_streaming_events`."""
from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from ascend_llm.sampling_params import SamplingParams
from ascend_llm.server.app import build_app
from ascend_llm.server.responses_protocol import ResponsesRequest
from ascend_llm.server.responses_request import to_chat_request
from ascend_llm.server.serving_chat import _Prepared
from ascend_llm.server.serving_engine import PromptInput
from ascend_llm.server.serving_responses import ResponsesServing
from ascend_llm.server.serving_tools import resolve_tools
from tests.server.conftest import MODEL, server_args
from tests.server.test_tools import _FakeStream, _auto
from tests.server.test_validation import _assert_error
from tests.server.tool_fixtures import TOOL_TEMPLATE

EVENTS = TypeAdapter(ResponseStreamEvent)
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CALL = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}
RESULT = {"type": "function_call_output", "call_id": "call_1", "output": "22 C, sunny"}
TURNS = [{"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]}, CALL, RESULT]
BASE = {"model": MODEL, "input": "hi", "max_output_tokens": 3}
LOGPROBS = "message.output_text.logprobs"


@pytest.fixture(scope="module")
def template_client(engine, tiny_llama_dir):
    """An app whose template renders tools (its prompts are too long for the tiny model to run)."""
    with TestClient(build_app(engine, server_args(tiny_llama_dir, "--chat-template", TOOL_TEMPLATE))) as test_client:
        yield test_client


def response_events(client: TestClient, body: dict[str, Any]) -> list[Any]:
    """The SSE events of a streamed call, parsed by the SDK's event union; `event:` must name the type."""
    with client.stream("POST", "/v1/responses", json=body) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return _parse_sse(response.iter_lines())


def _parse_sse(lines: Any) -> list[Any]:
    events, name = [], None
    for line in lines:
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            data = json.loads(line[len("data: "):])
            assert data["type"] == name, (name, data)
            events.append(EVENTS.validate_python(data))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    return events


# ---------------------------------------------------------------- non-streaming
def test_text_response_and_request_echo(client):
    body = {**BASE, "temperature": 0, "ignore_eos": True, "instructions": "Be brief", "metadata": {"k": "v"},
            "user": "u1", "store": True}
    response = Response.model_validate(client.post("/v1/responses", json=body).json())
    assert response.id.startswith("resp_") and response.object == "response" and response.model == MODEL
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    [message] = response.output
    assert message.type == "message" and message.id.startswith("msg_") and message.status == "incomplete"
    assert response.output_text == message.content[0].text and message.content[0].type == "output_text"
    usage = response.usage
    assert usage.output_tokens == 3 and usage.total_tokens == usage.input_tokens + 3 and usage.input_tokens > 0
    # the echo: as sent, the sampling values used; store is never honoured, so it reads false (vLLM's choice)
    assert (response.instructions, response.metadata, response.user, response.max_output_tokens) == \
        ("Be brief", {"k": "v"}, "u1", 3)
    assert response.temperature == 0.0 and response.top_p == 1.0 and response.store is False
    assert response.tool_choice == "auto" and response.tools == [] and response.text.format.type == "text"


def test_included_logprobs(client):
    # vLLM serving_responses.py `_create_response_logprobs`: one entry per output token, top_logprobs alternatives
    body = {**BASE, "ignore_eos": True, "include": [LOGPROBS], "top_logprobs": 2}
    response = Response.model_validate(client.post("/v1/responses", json=body).json())
    logprobs = response.output[0].content[0].logprobs
    assert len(logprobs) == response.usage.output_tokens == 3 and response.top_logprobs == 2
    assert all(len(entry.top_logprobs) == 2 and entry.logprob <= 0 for entry in logprobs)
    plain = Response.model_validate(client.post("/v1/responses", json={**BASE, "ignore_eos": True}).json())
    assert plain.output[0].content[0].logprobs == []


def test_streamed_logprobs_follow_the_text(client):
    body = {**BASE, "stream": True, "ignore_eos": True, "max_output_tokens": 4, "include": [LOGPROBS],
            "top_logprobs": 1}
    events = response_events(client, body)
    streamed = [entry for e in events if e.type == "response.output_text.delta" for entry in e.logprobs]
    [done] = [e for e in events if e.type == "response.output_text.done"]
    final = events[-1].response.output[0].content[0].logprobs
    assert len(final) == 4 and [(e.token, e.logprob) for e in done.logprobs] == [(e.token, e.logprob) for e in final]
    pairs = [(e.token, e.logprob) for e in final]
    assert streamed and [(e.token, e.logprob) for e in streamed] == pairs[:len(streamed)]


def test_input_items_instructions_and_tools_go_through_the_template(template_client):
    chat = template_client.app.state.handlers.chat
    req = ResponsesRequest(input=TURNS + [{"type": "message", "role": "user", "content": "And Rome?"}],
                           instructions="You are terse.", tools=[WEATHER], tool_choice="none")
    chat_req = to_chat_request(req)
    prompt = chat.render(chat_req.messages, tools=resolve_tools(chat_req, _auto("hermes")).prompt_tools).text
    assert prompt.startswith("<|im_start|>system\n<tools>") and json.dumps(
        {"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}) in prompt
    assert "<|im_start|>system\nYou are terse.<|im_end|>" in prompt
    assert '"arguments": {"city": "Paris"}' in prompt and '<tool_response id="call_1">\n22 C, sunny' in prompt
    assert prompt.endswith("<|im_start|>user\nAnd Rome?<|im_end|>\n<|im_start|>assistant\n")


def test_output_items_feed_back_as_input(client):
    # what the SDK sends for `input=[..., *response.output, ...]`: each item dumped with exclude_unset
    response = Response.model_validate(client.post("/v1/responses", json={**BASE, "ignore_eos": True}).json())
    items = [item.model_dump(exclude_unset=True, mode="json") for item in response.output]
    turns = [{"role": "user", "content": "hi"}, *items, {"role": "user", "content": "more"}]
    chat_req = to_chat_request(ResponsesRequest(input=turns))
    assert [(m.role, m.content) for m in chat_req.messages] == \
        [("user", "hi"), ("assistant", response.output_text), ("user", "more")]


def test_parallel_function_calls_join_one_assistant_turn():
    second = {**CALL, "call_id": "call_2", "arguments": '{"city": "Rome"}'}
    chat_req = to_chat_request(ResponsesRequest(input=TURNS[:2] + [second, RESULT], tools=[WEATHER]))
    roles = [m.role for m in chat_req.messages]
    assert roles == ["user", "assistant", "tool"]
    assert [c["id"] for c in chat_req.messages[1].tool_calls] == ["call_1", "call_2"]
    assert chat_req.tools[0]["function"]["name"] == "get_weather"


def test_required_and_named_choices_set_the_tool_grammar(template_client):
    chat = template_client.app.state.handlers.chat
    named = ResponsesRequest(input="x", tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"})
    assert chat.prepare(to_chat_request(named)).params.structured_outputs.json == WEATHER["parameters"]
    required = ResponsesRequest(input="x", tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)
    assert chat.prepare(to_chat_request(required)).params.structured_outputs.json["maxItems"] == 1
    fmt = {"format": {"type": "json_schema", "name": "city", "schema": WEATHER["parameters"], "strict": True}}
    assert chat.prepare(to_chat_request(ResponsesRequest(input="x", text=fmt))).params.structured_outputs.json == \
        WEATHER["parameters"]


# ------------------------------------------------------------------------ 400s
@pytest.mark.parametrize("extra,param", [
    ({"frequency_penalty": 1}, "frequency_penalty"),             # unknown here: never ignored
    ({"input": ""}, "input"), ({"input": []}, "input"), ({"input": None}, "input"),
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"reasoning": {"effort": "low"}}, "reasoning"), ({"background": True}, "background"),
    ({"include": ["file_search_call.results"]}, "include"), ({"truncation": "auto"}, "truncation"),
    ({"include": [LOGPROBS], "tools": [WEATHER], "tool_choice": "required"}, "include"),
    ({"include": [LOGPROBS], "top_logprobs": 100}, "top_logprobs"),
    ({"conversation": "conv_1"}, "conversation"), ({"top_logprobs": 2}, "top_logprobs"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tools": [{"type": "file_search", "vector_store_ids": ["v"]}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools[0].function"),   # chat's nested shape
    ({"tools": [{"type": "function", "name": "my tool"}]}, "tools[0].name"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "array"}}]}, "tools[0].parameters"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER]}, "tool_choice"),         # "auto" (the default) needs --enable-auto-tool-choice, as chat
    ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0].type"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
    ({"input": [RESULT]}, "input[0].call_id"),                   # no function_call with that call_id before it
    ({"input": [{**CALL, "arguments": "{bad"}]}, "input[0].arguments"),
    ({"input": [{**CALL, "call_id": None}]}, "input[0].call_id"),
    ({"input": [{"role": "user", "content": "x", "foo": 1}]}, "input[0].foo"),
    ({"max_output_tokens": 0}, "max_output_tokens"), ({"temperature": 3}, "temperature"),
    ({"text": {"format": {"type": "json_schema", "name": "a"}}}, "text.format.schema"),
    ({"text": {"format": {"type": "json_schema", "name": "a", "schema": {"type": "nonsense"}}}}, "text.format"),
    ({"text": {"format": {"type": "yaml"}}}, "text.format.type"),
    ({"text": {"verbosity": "high"}}, "text.verbosity"),
    ({"text": {"format": {"type": "json_object"}}, "structured_outputs": {"regex": "a+"}}, "structured_outputs"),
])
def test_bad_requests_are_400_naming_the_field(client, extra, param):
    _assert_error(client.post("/v1/responses", json={**BASE, **extra}), 400, param)


def test_a_bad_request_leaves_the_next_one_alone(client):
    _assert_error(client.post("/v1/responses", json={**BASE, "input": [RESULT]}), 400, "input[0].call_id")
    assert client.post("/v1/responses", json=BASE).status_code == 200


# --------------------------------------------------------------------- streaming
def test_streamed_text_events(client):
    events = response_events(client, {**BASE, "stream": True, "ignore_eos": True, "max_output_tokens": 4})
    types = [e.type for e in events]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[4:4 + len(deltas)] == ["response.output_text.delta"] * len(deltas) and deltas
    assert types[4 + len(deltas):] == ["response.output_text.done", "response.content_part.done",
                                       "response.output_item.done", "response.incomplete"]
    final = events[-1].response
    assert final.output_text == "".join(deltas) == events[-4].text and final.usage.output_tokens == 4
    assert final.output[0].id == events[2].item.id == events[-2].item.id and final.id == events[0].response.id
    assert final.created_at == events[0].response.created_at


def _prepared(req: ResponsesRequest) -> _Prepared:
    """What ChatServing.prepare would give, without an engine (hermes parser for "auto")."""
    chat_req = to_chat_request(req)
    tools = resolve_tools(chat_req, _auto("hermes")) if chat_req.tools else None
    return _Prepared(chat_req, MODEL, PromptInput("p", [1, 2]), SamplingParams(), None, tools=tools)


def _serving(tools_body: dict[str, Any], pieces: list[str], finish_reason: str = "stop") -> list[Any]:
    """The events ResponsesServing streams for an engine output growing through `pieces`."""
    req = ResponsesRequest(input="x", stream=True, **tools_body)

    async def collect() -> list[str]:
        stream = _FakeStream(pieces, finish_reason)
        return [e async for e in ResponsesServing(None, None)._stream("resp_1", req, _prepared(req), stream, 7)]
    return _parse_sse("".join(asyncio.run(collect())).splitlines())


def _growing(text: str, step: int) -> list[str]:
    return [text[:i] for i in range(step, len(text), step)] + [text]


HERMES = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
          '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>')


@pytest.mark.parametrize("step", [1, 7, len(HERMES)])
def test_streamed_function_calls_match_the_final_response(step):
    events = _serving({"tools": [WEATHER], "tool_choice": "auto"}, _growing(HERMES, step))
    final = events[-1]
    assert final.type == "response.completed" and final.response.status == "completed"
    message, first, second = final.response.output
    assert message.type == "message" and message.content[0].text.strip() == "Let me check."
    assert [(c.type, c.name, json.loads(c.arguments)) for c in (first, second)] == \
        [("function_call", "get_weather", {"city": "Paris"}), ("function_call", "get_weather", {"city": "Rome"})]
    assert first.call_id.startswith("call_") and first.id.startswith("fc_") and first.call_id != second.call_id
    added = [e.item for e in events if e.type == "response.output_item.added"]
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert [i.id for i in added] == [i.id for i in done] == [i.id for i in final.response.output]
    for index, call in ((1, first), (2, second)):
        streamed = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta"
                           and e.output_index == index)
        [args_done] = [e for e in events if e.type == "response.function_call_arguments.done"
                       and e.output_index == index]
        assert streamed == args_done.arguments == call.arguments
    # every item is closed before the next one opens
    opened = [e.type for e in events if e.type in ("response.output_item.added", "response.output_item.done")]
    assert opened == ["response.output_item.added", "response.output_item.done"] * 3


def test_required_choice_streams_calls_without_a_message():
    text = '[{"name": "get_weather", "parameters": {"city": "Oslo"}}]'
    events = _serving({"tools": [WEATHER], "tool_choice": "required"}, _growing(text, 5))
    [call] = events[-1].response.output
    assert call.type == "function_call" and json.loads(call.arguments) == {"city": "Oslo"}
    assert not [e for e in events if e.type.startswith("response.output_text")]


def test_empty_output_is_one_empty_message():
    events = _serving({}, [""], finish_reason="stop")
    assert [e.type for e in events][2:] == ["response.output_item.added", "response.content_part.added",
                                           "response.output_text.done", "response.content_part.done",
                                           "response.output_item.done", "response.completed"]
    assert events[-1].response.output_text == ""


def test_client_going_away_aborts_the_engine_request():
    aborted = []

    class _Stream(_FakeStream):
        def abort(self) -> None:
            aborted.append(True)

    req = ResponsesRequest(input="x", stream=True)

    async def two_events_then_close() -> None:
        stream = _Stream(["a", "ab", "abc"], "stop")
        gen = ResponsesServing(None, None)._stream("resp_1", req, _prepared(req), stream, 7)
        await gen.__anext__()
        await gen.__anext__()
        await gen.aclose()          # what Starlette does when the client disconnects mid-stream
    asyncio.run(two_events_then_close())
    assert aborted == [True]
