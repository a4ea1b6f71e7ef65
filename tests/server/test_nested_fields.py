"""Nested request objects are strict: an unknown key inside a message, a content part, a tool call, a tool,
`tool_choice`, `response_format` or `stream_options` is a 400 naming its full path (`messages[1].foo`, as
OpenAI's `param` names nested fields), a non-text content part is a 400 naming its `type` (this model takes
text only), and what real clients send back (the openai SDK's assistant message, LangChain's message
conversion) is accepted."""
from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_openai.chat_models.base import _convert_message_to_dict
from openai.types.chat import ChatCompletionMessage

from ascend_llm.server.chat_messages import template_message
from ascend_llm.server.protocol import ChatMessageIn
from tests.server.conftest import MODEL

USER = {"role": "user", "content": "What is the weather in Paris?"}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CHAT = {"model": MODEL, "messages": [USER], "max_tokens": 2, "temperature": 0}


def _chat(**fields) -> dict:
    return {**CHAT, **fields}


def _assert_400(resp, param: str, text: str | None = None) -> None:
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and param in err["message"] and err["code"] == 400, err
    if text is not None:
        assert text in err["message"], err


@pytest.mark.parametrize("body,param", [
    (_chat(messages=[USER, {"role": "assistant", "content": "x", "foo": 1}]), "messages[1].foo"),
    (_chat(messages=[{"role": "user", "content": [{"type": "text", "text": "x", "foo": 1}]}]),
     "messages[0].content[0].foo"),
    (_chat(messages=[USER, {"role": "assistant", "tool_calls": [{**CALL, "foo": 1}]},
                     {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]), "messages[1].tool_calls[0].foo"),
    (_chat(messages=[USER, {"role": "assistant", "tool_calls": [{**CALL, "function": {**CALL["function"], "foo": 1}}]},
                     {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]),
     "messages[1].tool_calls[0].function.foo"),
    (_chat(tools=[{**TOOL, "foo": 1}], tool_choice="none"), "tools[0].foo"),
    (_chat(tools=[{**TOOL, "function": {**TOOL["function"], "foo": 1}}], tool_choice="none"), "tools[0].function.foo"),
    (_chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}, "foo": 1}),
     "tool_choice.foo"),
    (_chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "get_weather", "foo": 1}}),
     "tool_choice.function.foo"),
    (_chat(response_format={"type": "json_object", "foo": 1}), "response_format.foo"),
    (_chat(response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"},
                                                                   "foo": 1}}), "response_format.json_schema.foo"),
    (_chat(stream=True, stream_options={"include_usage": True, "foo": 1}), "stream_options.foo"),
])
def test_unknown_nested_key_is_400_naming_its_path(client, body, param):
    _assert_400(client.post("/v1/chat/completions", json=body), param, "does not support")


@pytest.mark.parametrize("extra,param", [
    ({"stream": True, "stream_options": {"include_usage": True, "foo": 1}}, "stream_options.foo"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"},
                                                                 "foo": 1}}}, "response_format.json_schema.foo"),
])
def test_completions_nested_objects_are_strict(client, extra, param):
    body = {"model": MODEL, "prompt": "The quick", "max_tokens": 2, **extra}
    _assert_400(client.post("/v1/completions", json=body), param, "does not support")


def test_tokenize_messages_are_strict_too(client):
    _assert_400(client.post("/tokenize", json={"messages": [USER, {"role": "user", "content": "x", "foo": 1}]}),
                "messages[1].foo")


@pytest.mark.parametrize("part", [
    {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
    {"type": "file", "file": {"file_id": "file-1"}},
])
def test_non_text_part_is_400_naming_its_type(client, part):
    body = _chat(messages=[{"role": "user", "content": [{"type": "text", "text": "Describe:"}, part]}])
    _assert_400(client.post("/v1/chat/completions", json=body), "messages[0].content[1].type", "text only")


@pytest.mark.parametrize("message,param", [
    ({"role": "assistant", "content": None, "audio": {"id": "audio_1"}}, "messages[1].audio"),
    ({"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}},
     "messages[1].function_call"),
    ({"role": "assistant", "content": "See [1].", "annotations": [{"type": "url_citation"}]},
     "messages[1].annotations"),
    ({"role": "assistant", "content": "Hi", "refusal": "I can't."}, "messages[1].refusal"),
    ({"role": "user", "content": "Hi", "refusal": "I can't."}, "messages[1].refusal"),
    ({"role": "user", "content": "Hi", "reasoning": "thinking"}, "messages[1].reasoning"),
    ({"role": "user", "content": "Hi", "tool_call_id": "call_1"}, "messages[1].tool_call_id"),
    ({"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}, "messages[1].content[0].type"),
    ({"role": "assistant", "content": None, "tool_calls": [{**CALL, "type": "custom"}]},
     "messages[1].tool_calls[0].type"),
])
def test_message_field_with_a_value_it_cannot_honour_is_400(client, message, param):
    _assert_400(client.post("/v1/chat/completions", json=_chat(messages=[USER, message])), param)


def _sdk_assistant(**fields) -> dict:
    """An assistant message as the openai SDK sends it back: the response's ChatCompletionMessage, parsed from
    JSON that carries every field OpenAI returns, serialised as the SDK's request transform does
    (`model_dump(exclude_unset=True, mode="json")`, openai/_utils/_transform.py) -- i.e. `to_dict()`."""
    full = {"role": "assistant", "content": None, "refusal": None, "annotations": [], "audio": None,
            "function_call": None, "tool_calls": None, **fields}
    return ChatCompletionMessage.model_validate(full).to_dict(mode="json")


def test_openai_sdk_assistant_messages_round_trip(client):
    called = _sdk_assistant(tool_calls=[CALL])
    assert {"refusal", "annotations", "audio", "function_call", "tool_calls"} <= set(called)
    messages = [USER, called, {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                _sdk_assistant(content="It is sunny."), {"role": "user", "content": "And tomorrow?"}]
    resp = client.post("/v1/chat/completions", json=_chat(messages=messages, tools=[TOOL], tool_choice="none"))
    assert resp.status_code == 200, resp.text
    # a refusal is sent back with content null: its text is the assistant turn (below)
    refused = [USER, _sdk_assistant(refusal="I can't help with that."), {"role": "user", "content": "Why?"}]
    assert client.post("/v1/chat/completions", json=_chat(messages=refused)).status_code == 200


def test_langchain_message_conversion_round_trip(client):
    history = [SystemMessage("You are terse."), HumanMessage("Weather in Paris?", name="alice"),
               AIMessage("", tool_calls=[{"id": "call_1", "name": "get_weather", "args": {"city": "Paris"}}]),
               ToolMessage("sunny", tool_call_id="call_1"), AIMessage("It is sunny."),
               HumanMessage([{"type": "text", "text": "And "}, {"type": "text", "text": "tomorrow?"}])]
    messages = [_convert_message_to_dict(m) for m in history]
    assert messages[2]["content"] is None and messages[2]["tool_calls"][0]["function"]["name"] == "get_weather"
    resp = client.post("/v1/chat/completions", json=_chat(messages=messages, tools=[TOOL], tool_choice="none"))
    assert resp.status_code == 200, resp.text


def test_template_message_carries_name_reasoning_and_refusal():
    # vLLM's chat_utils.py `_parse_chat_message_content`: `name` goes to the template for every role, an
    # assistant's `reasoning` as both `reasoning` and `reasoning_content`; its refusal content parts are read as
    # text. vLLM drops an assistant's string `refusal` field; here it is the turn's text when content is empty
    # (that is what the model said) and a 400 next to content, so it is never silently lost.
    user = template_message(ChatMessageIn(role="user", content="hi", name="alice"), 0)
    assert user == {"role": "user", "content": "hi", "name": "alice"}
    thought = template_message(ChatMessageIn(role="assistant", content="4", reasoning_content="2+2"), 1)
    assert thought["reasoning"] == thought["reasoning_content"] == "2+2"
    refusal = template_message(ChatMessageIn(role="assistant", content=None, refusal="I can't."), 1)
    assert refusal["content"] == "I can't."
    parts = ChatMessageIn.model_validate({"role": "assistant", "content": [{"type": "text", "text": "a"},
                                                                           {"type": "refusal", "refusal": "b"}]})
    assert template_message(parts, 1)["content"] == "ab"
    assert "tool_calls" not in template_message(ChatMessageIn(role="assistant", content="x", tool_calls=[]), 1)
