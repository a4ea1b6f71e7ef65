"""Chat messages as chat templates take them (vLLM's chat_utils.py `_parse_chat_message_content` and
`_postprocess_messages`): the text of the content, `name` for every role, an assistant's tool calls
with their arguments as dicts and its `reasoning` (as `reasoning` and `reasoning_content`), a tool
result's `tool_call_id`.

A message field that cannot be honoured is a 400 naming `messages[i].field`, never dropped:
`audio`, `function_call` or `annotations` with a value, `reasoning` / `refusal` on a role that
does not have them, `tool_call_id` outside a tool result. Null / empty values are accepted, so the
openai SDK's `messages.append(response.choices[0].message)` works."""
from __future__ import annotations

import json
from typing import Any

from ascend_llm.server.errors import bad_request, check_keys
from ascend_llm.server.protocol import ChatMessageIn

_CALL_KEYS = {"id", "type", "function"}
_CALL_FUNCTION_KEYS = {"name", "arguments"}


def content_text(message: ChatMessageIn, index: int) -> str:
    """The message's text: its content string, its parts' texts joined, or its refusal."""
    content = message.content
    if content is None or isinstance(content, str):
        text = content or ""
    else:
        for j, part in enumerate(content):
            if part.type == "refusal" and message.role != "assistant":
                raise bad_request(f"messages[{index}].content[{j}].type: 'refusal' parts are only allowed in "
                                  "assistant messages", f"messages[{index}].content[{j}].type")
        text = "".join(part.value for part in content)
    if message.refusal is None:
        return text
    where = f"messages[{index}].refusal"
    if message.role != "assistant":
        raise bad_request(f"{where}: only assistant messages have a refusal", where)
    if text:
        raise bad_request(f"{where}: a message has either content or a refusal, not both", where)
    return message.refusal


def template_message(message: ChatMessageIn, index: int) -> dict[str, Any]:
    """One message as chat templates expect it; 400 naming `messages[index]...` on a field it cannot honour."""
    _check_unsupported(message, index)
    out: dict[str, Any] = {"role": message.role, "content": content_text(message, index)}
    if message.name is not None:
        out["name"] = message.name
    if message.tool_calls is not None:
        if message.role != "assistant":
            raise bad_request(f"messages[{index}].tool_calls: only assistant messages have tool calls",
                              f"messages[{index}].tool_calls")
        if message.tool_calls:      # an empty list is dropped, as vLLM does, so templates take the plain path
            out["tool_calls"] = [_template_tool_call(call, index, j) for j, call in enumerate(message.tool_calls)]
    reasoning = _reasoning(message, index)
    if reasoning is not None:
        out["reasoning"] = out["reasoning_content"] = reasoning
    if message.role == "tool":
        if not message.tool_call_id:
            raise bad_request(f"Missing required parameter: 'messages[{index}].tool_call_id'",
                              f"messages[{index}].tool_call_id")
        out["tool_call_id"] = message.tool_call_id
    elif message.tool_call_id is not None:
        raise bad_request(f"messages[{index}].tool_call_id: only tool messages answer a tool call",
                          f"messages[{index}].tool_call_id")
    return out


def _check_unsupported(message: ChatMessageIn, index: int) -> None:
    unsupported = {
        "audio": (message.audio is not None, "audio replies are not supported: this model takes text only"),
        "function_call": (message.function_call is not None, "the deprecated `function_call` is not supported; "
                                                             "send the call in `tool_calls`"),
        "annotations": (bool(message.annotations), "annotations (url citations) cannot be passed to the model; "
                                                   "send null or []"),
    }
    for name, (bad, why) in unsupported.items():
        if bad:
            raise bad_request(f"messages[{index}].{name}: {why}", f"messages[{index}].{name}")


def _reasoning(message: ChatMessageIn, index: int) -> str | None:
    """vLLM's `reasoning` (or its older spelling `reasoning_content`) of an assistant message."""
    given = {name: value for name in ("reasoning", "reasoning_content")
             if (value := getattr(message, name)) is not None}
    if not given:
        return None
    name = next(iter(given))
    if message.role != "assistant":
        raise bad_request(f"messages[{index}].{name}: only assistant messages have reasoning",
                          f"messages[{index}].{name}")
    if len(set(given.values())) > 1:
        raise bad_request(f"messages[{index}].reasoning_content: differs from `reasoning`; send one of them",
                          f"messages[{index}].reasoning_content")
    return given[name]


def _template_tool_call(call: Any, index: int, j: int) -> dict[str, Any]:
    """A tool call with its arguments as a dict (as transformers and vLLM pass them)."""
    where = f"messages[{index}].tool_calls[{j}]"
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise bad_request(f"Invalid '{where}': expected {{\"id\", \"type\": \"function\", \"function\": "
                          f"{{\"name\", \"arguments\"}}}}", where)
    check_keys(call, _CALL_KEYS, where)
    check_keys(function, _CALL_FUNCTION_KEYS, f"{where}.function")
    if call.get("type", "function") != "function":
        raise bad_request(f"Invalid '{where}.type': only 'function' tool calls are supported, got "
                          f"{call.get('type')!r}", f"{where}.type")
    arguments = function.get("arguments")
    if isinstance(arguments, str) and arguments.strip():
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise bad_request(f"Invalid '{where}.function.arguments': not JSON ({exc})",
                              f"{where}.function.arguments") from None
    elif not isinstance(arguments, (dict, list)):
        arguments = {}
    return {"id": call.get("id"), "type": "function", "function": {"name": function["name"], "arguments": arguments}}
