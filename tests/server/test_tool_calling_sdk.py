"""Tool calling against a real server process (bundled SmolLM2, hermes parser) with the openai SDK
and LangChain: tool_choice "none" and "auto", streamed and not, and a two-turn conversation that
feeds back the assistant's tool call and the tool's result. The small model may or may not call
the tool, so the assertions are on the shapes (content, or tool calls with JSON object arguments)
and on streaming matching non-streaming at temperature 0."""
from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.server.tool_fixtures import CALL, QUESTION, SYSTEM, TOOLS, TWO_TURNS, smollm2_server

MAX_TOKENS = 3
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    yield from smollm2_server(tmp_path_factory, "--enable-auto-tool-choice", "--tool-call-parser", "hermes")


@pytest.fixture(scope="module")
def sdk(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(sdk) -> str:
    return sdk.models.list().data[0].id


def _check_message(message, finish_reason: str) -> list[tuple[str, dict]]:
    """Content or valid tool calls; the calls as (name, arguments)."""
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]
    if calls:
        assert finish_reason == "tool_calls" and all(name == "get_weather" and isinstance(args, dict)
                                                     for name, args in calls)
    else:
        assert isinstance(message.content, str) and finish_reason in ("stop", "length")
    return calls


def _streamed(sdk, **kwargs):
    content, calls, finish = "", {}, None
    for chunk in sdk.chat.completions.create(stream=True, **kwargs):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for d in delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": d.id, "name": d.function.name, "arguments": ""})
            call["arguments"] += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return content, [(c["name"], json.loads(c["arguments"])) for c in calls.values()], finish


def test_two_turn_auto_streamed_and_not(sdk, model):
    # turn 2: the assistant's tool call and the tool's result fed back
    kwargs = dict(model=model, messages=TWO_TURNS, tools=TOOLS, tool_choice="auto", max_tokens=MAX_TOKENS,
                  temperature=0)
    resp = sdk.chat.completions.create(**kwargs)
    choice = resp.choices[0]
    calls = _check_message(choice.message, choice.finish_reason)
    content, streamed_calls, finish = _streamed(sdk, **kwargs)
    assert (content or None, streamed_calls, finish) == (choice.message.content, calls, choice.finish_reason)


def test_none_renders_the_tools_and_answers_in_text(sdk, model, base_url):
    resp = sdk.chat.completions.create(model=model, messages=TWO_TURNS, tools=TOOLS, tool_choice="none",
                                       max_tokens=2)
    assert resp.choices[0].message.tool_calls is None and isinstance(resp.choices[0].message.content, str)
    # the tools (chat only) and the assistant's call and the tool's result (both) are in the prompt
    with_turns = httpx.post(base_url + "/tokenize", json={"messages": TWO_TURNS}).json()["count"]
    without = httpx.post(base_url + "/tokenize", json={"messages": [SYSTEM, QUESTION]}).json()["count"]
    assert resp.usage.prompt_tokens > with_turns + 20 and with_turns > without + 20


def test_bad_tool_choice_is_a_400(sdk, model):
    with pytest.raises(openai.BadRequestError) as err:
        sdk.chat.completions.create(model=model, messages=[QUESTION], tools=TOOLS,
                                    tool_choice={"type": "function", "function": {"name": "nope"}})
    assert err.value.param == "tool_choice"
    with pytest.raises(openai.BadRequestError) as err:
        sdk.chat.completions.create(model=model, messages=[QUESTION], tool_choice="auto")
    assert err.value.param == "tool_choice"


def test_langchain_bind_tools(base_url, model):
    from langchain_openai import ChatOpenAI

    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return "sunny"

    llm = ChatOpenAI(base_url=base_url + "/v1", api_key="unused", model=model, max_tokens=MAX_TOKENS,
                     temperature=0, max_retries=0).bind_tools([get_weather])
    message = llm.invoke([("system", SYSTEM["content"]), ("user", QUESTION["content"])])
    assert isinstance(message.content, str) and isinstance(message.tool_calls, list)
    assert all(call["name"] == "get_weather" and isinstance(call["args"], dict) for call in message.tool_calls)
    assert not message.invalid_tool_calls


def test_clients_send_the_response_message_back(sdk, model):
    # the openai SDK's round trip `messages.append(resp.choices[0].message)`: a ChatCompletionMessage (this
    # server's, and one shaped as OpenAI returns it, with refusal / annotations / audio / function_call), which
    # the SDK itself serialises; then LangChain's: the AIMessage it parses from that response
    # (`_convert_dict_to_message`, as `invoke` does), an AIMessage with tool calls and a ToolMessage. Nested
    # request objects are strict (test_nested_fields.py); what these clients send back must still be accepted.
    from langchain_core.messages import AIMessage, ToolMessage
    from langchain_openai import ChatOpenAI
    from langchain_openai.chat_models.base import _convert_dict_to_message
    from openai.types.chat import ChatCompletionMessage

    reply = sdk.chat.completions.create(model=model, messages=[SYSTEM, QUESTION], max_tokens=1).choices[0].message
    called = ChatCompletionMessage.model_validate({"role": "assistant", "content": None, "refusal": None,
                                                   "annotations": [], "audio": None, "function_call": None,
                                                   "tool_calls": [CALL]})
    messages = [SYSTEM, QUESTION, reply, QUESTION, called,
                {"role": "tool", "tool_call_id": CALL["id"], "content": "sunny"}]
    answer = sdk.chat.completions.create(model=model, messages=messages, max_tokens=1).choices[0].message
    assert isinstance(answer.content, str)
    llm = ChatOpenAI(base_url=str(sdk.base_url), api_key="unused", model=model, max_tokens=1, max_retries=0)
    lc_call = AIMessage("", tool_calls=[{"id": "call_1", "name": "get_weather", "args": {"city": "Paris"}}])
    lc_answer = llm.invoke([("system", SYSTEM["content"]), ("user", QUESTION["content"]),
                            _convert_dict_to_message(reply.model_dump()), ("user", QUESTION["content"]), lc_call,
                            ToolMessage("sunny", tool_call_id="call_1")])
    assert isinstance(lc_answer.content, str)
