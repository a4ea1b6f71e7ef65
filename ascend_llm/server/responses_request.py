"""A Responses API request read as the chat request it means, so /v1/responses runs through the
chat path (template, tool parsers, grammar-enforced `tool_choice`, structured outputs, sampling).

- `instructions` + `input` (a string, or message / `function_call` / `function_call_output`
  items) -> chat messages, as vLLM's responses utils (`construct_input_messages`,
  `construct_chat_messages_with_tool_call`) build them: consecutive `function_call` items join one
  assistant turn, a `function_call_output` becomes a `tool` message with its `call_id`;
- flat function tools (`{"type": "function", "name", "parameters", ...}`) -> chat's nested shape;
  `tool_choice` `{"type": "function", "name"}` -> chat's named choice;
- `text.format` -> `response_format`; `max_output_tokens` -> `max_completion_tokens`.

Every 400 names the Responses field (`input[3].call_id`, `tools[0].name`, `text.format`, ...):
the chat path's own errors are renamed by `responses_error`."""
from __future__ import annotations

import json
import re
from typing import Any

from pydantic import ValidationError

from ascend_llm.server.body import validation_error
from ascend_llm.server.errors import APIError, bad_request
from ascend_llm.server.protocol import ChatCompletionRequest, ChatMessageIn
from ascend_llm.server.responses_protocol import ResponsesRequest
from ascend_llm.server.serving_tools import require_function_tool

OUTPUT_LOGPROBS = "message.output_text.logprobs"      # the one `include` value this server produces
_MESSAGE_ROLES = ("user", "system", "developer", "assistant")
_ITEM_KEYS = {
    "message": {"type", "role", "content", "id", "status", "phase"},
    "function_call": {"type", "call_id", "name", "arguments", "id", "status"},
    "function_call_output": {"type", "call_id", "output", "id", "status"},
}
_PART_KEYS = {"input_text": {"type", "text"}, "output_text": {"type", "text", "annotations", "logprobs"}}
_TOOL_KEYS = {"type", "name", "description", "parameters", "strict"}
_FORMAT_KEYS = {"text": {"type"}, "json_object": {"type"},
                "json_schema": {"type", "name", "schema", "strict", "description"}}
_SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PASSED_THROUGH = ("model", "temperature", "top_p", "parallel_tool_calls", "top_k", "min_p", "seed", "stop",
                   "repetition_penalty", "ignore_eos", "logit_bias", "skip_special_tokens",
                   "include_stop_str_in_output", "structured_outputs", "user", "stream")
# chat-path field names -> the Responses field a 400 must name (in `param` and in the message)
_RENAMES = ((re.compile(r"\bmessages(\[\d+\]|\.\d+)?"), "input"),
            (re.compile(r"\bmax_completion_tokens\b"), "max_output_tokens"),
            (re.compile(r"\bresponse_format\b"), "text.format"),
            (re.compile(r"\b(tools\[\d+\])\.function\b"), r"\1"))


def to_chat_request(req: ResponsesRequest) -> ChatCompletionRequest:
    """The chat request `req` means; 400 naming the Responses field on bad or unsupported input."""
    check_unsupported(req)
    tools = chat_tools(req.tools)
    fields: dict[str, Any] = {name: getattr(req, name) for name in _PASSED_THROUGH}
    fields.update(messages=input_messages(req.instructions, req.input), tools=tools,
                  tool_choice=chat_tool_choice(req.tool_choice, tools),
                  max_completion_tokens=req.max_output_tokens, response_format=response_format(req.text),
                  **_logprobs(req, tools))
    try:
        return ChatCompletionRequest.model_validate(fields)
    except ValidationError as exc:     # fields were checked above; this names whatever slipped through
        raise responses_error(validation_error(exc)) from None


def responses_error(exc: APIError) -> APIError:
    """`exc` from the chat path, naming the Responses field instead of the chat one."""
    message, param = exc.message, exc.param
    for pattern, replacement in _RENAMES:
        message = pattern.sub(replacement, message)
        param = pattern.sub(replacement, param) if param else param
    if param == "prompt":              # the engine's default for prompt errors
        param = "input"
    if (message, param) == (exc.message, exc.param):
        return exc
    return APIError(exc.status, message, param, exc.err_type, exc.headers)


# -------------------------------------------------------- unsupported fields
def check_unsupported(req: ResponsesRequest) -> None:
    """OpenAI fields this server does not implement: anything but their default is a 400."""
    if req.previous_response_id is not None:
        raise bad_request("previous_response_id: this server does not store responses; send the whole "
                          "conversation in `input` instead", "previous_response_id")
    unsupported = {
        "conversation": (req.conversation is not None, "conversations are not stored here; send the whole "
                                                       "conversation in `input`"),
        "background": (bool(req.background), "background mode needs stored responses"),
        "reasoning": (req.reasoning is not None, "reasoning options are not supported"),
        "include": (bool(set(req.include or ()) - {OUTPUT_LOGPROBS}),
                    f"{sorted(set(req.include or ()) - {OUTPUT_LOGPROBS})} cannot be produced here (only "
                    f"{OUTPUT_LOGPROBS!r})"),
        "max_tool_calls": (req.max_tool_calls is not None, "not supported"),
        "prompt": (req.prompt is not None, "stored prompt templates are not supported"),
        "top_logprobs": (bool(req.top_logprobs) and not wants_logprobs(req),
                         f"needs include [{OUTPUT_LOGPROBS!r}] (logprobs are returned only when included)"),
        "stream_options": (req.stream_options is not None, "not supported"),
        "truncation": (req.truncation == "auto", "'auto' truncation is not supported; the prompt must fit"),
    }
    for name, (bad, why) in unsupported.items():
        if bad:
            raise bad_request(f"{name}: {why}", name)


def wants_logprobs(req: ResponsesRequest) -> bool:
    """Whether the request includes the output text's logprobs."""
    return OUTPUT_LOGPROBS in (req.include or ())


def _logprobs(req: ResponsesRequest, tools: list[dict[str, Any]] | None) -> dict[str, Any]:
    """Chat's `logprobs` / `top_logprobs` for `include: ["message.output_text.logprobs"]`. They cover
    the message text only, so a request whose output may hold function calls cannot have them."""
    if not wants_logprobs(req):
        return {}
    if tools and req.tool_choice != "none":
        raise bad_request(f"include: {OUTPUT_LOGPROBS!r} is supported only for plain-text output (no tools, or "
                          "tool_choice 'none')", "include")
    return {"logprobs": True, "top_logprobs": req.top_logprobs or 0}


# ------------------------------------------------------------------ input
def input_messages(instructions: str | None, items: str | list[Any] | None) -> list[ChatMessageIn]:
    """`instructions` as a system message, then the input as chat messages."""
    if items is None:
        raise bad_request("Missing required parameter: 'input'.", "input")
    if not items:
        raise bad_request("input: must not be empty", "input")
    messages = [ChatMessageIn(role="system", content=instructions)] if instructions else []
    if isinstance(items, str):
        return messages + [ChatMessageIn(role="user", content=items)]
    call_ids: set[str] = set()
    for i, item in enumerate(items):
        _append_item(messages, _check_item(item, i), i, call_ids)
    return messages


def _check_item(item: Any, i: int) -> dict[str, Any]:
    where = f"input[{i}]"
    if not isinstance(item, dict):
        raise bad_request(f"Invalid '{where}': expected an object", where)
    kind = item.get("type", "message" if "role" in item else None)
    if kind not in _ITEM_KEYS:
        raise bad_request(f"Invalid '{where}.type': input items of type {kind!r} are not supported (only "
                          "'message', 'function_call' and 'function_call_output')", f"{where}.type")
    extra = sorted(set(item) - _ITEM_KEYS[kind])
    if extra:
        raise bad_request(f"{where}.{extra[0]}: this server does not support the field `{extra[0]}` on "
                          f"'{kind}' items", f"{where}.{extra[0]}")
    return {**item, "type": kind}


def _append_item(messages: list[ChatMessageIn], item: dict[str, Any], i: int, call_ids: set[str]) -> None:
    kind = item["type"]
    if kind == "message":
        messages.append(_message(item, i))
    elif kind == "function_call":
        call = _function_call(item, i)
        call_ids.add(call["id"])
        last = messages[-1] if messages else None
        if last is not None and last.role == "assistant":      # parallel calls: one assistant turn
            last.tool_calls = [*(last.tool_calls or []), call]
        else:
            messages.append(ChatMessageIn(role="assistant", content=None, tool_calls=[call]))
    else:
        call_id = _required_str(item, "call_id", i)
        if call_id not in call_ids:
            raise bad_request(f"No tool call found for function call output with call_id {call_id!r} "
                              f"(input[{i}].call_id names no earlier function_call item)", f"input[{i}].call_id")
        messages.append(ChatMessageIn(role="tool", content=_text(item.get("output"), f"input[{i}].output",
                                                                  ("input_text",)), tool_call_id=call_id))


def _message(item: dict[str, Any], i: int) -> ChatMessageIn:
    role = item.get("role")
    if role not in _MESSAGE_ROLES:
        raise bad_request(f"Invalid 'input[{i}].role': {role!r}; expected one of {list(_MESSAGE_ROLES)}",
                          f"input[{i}].role")
    kinds = ("output_text", "input_text") if role == "assistant" else ("input_text",)
    return ChatMessageIn(role=role, content=_text(item.get("content"), f"input[{i}].content", kinds))


def _text(content: Any, where: str, kinds: tuple[str, ...]) -> str:
    """A string, or the text of a list of text parts (`input_text` / `output_text`)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"Invalid '{where}': expected a string or a list of content parts", where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in kinds:
            raise bad_request(f"Invalid '{where}[{j}].type': content parts of type {kind!r} are not supported "
                              f"here (only {list(kinds)})", f"{where}[{j}].type")
        extra = sorted(set(part) - _PART_KEYS[kind])
        if extra:
            raise bad_request(f"{where}[{j}].{extra[0]}: this server does not support the field `{extra[0]}`",
                              f"{where}[{j}].{extra[0]}")
        if not isinstance(part.get("text"), str):
            raise bad_request(f"Missing required parameter: '{where}[{j}].text'", f"{where}[{j}].text")
        texts.append(part["text"])
    return "".join(texts)


def _function_call(item: dict[str, Any], i: int) -> dict[str, Any]:
    """A `function_call` item as a chat tool call (its `call_id` is the chat call's id)."""
    call_id, name = _required_str(item, "call_id", i), _required_str(item, "name", i)
    arguments = _required_str(item, "arguments", i, empty_ok=True)
    try:
        json.loads(arguments or "{}")
    except json.JSONDecodeError as exc:
        raise bad_request(f"Invalid 'input[{i}].arguments': not JSON ({exc})", f"input[{i}].arguments") from None
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _required_str(item: dict[str, Any], key: str, i: int, empty_ok: bool = False) -> str:
    value = item.get(key)
    if not isinstance(value, str) or (not value and not empty_ok):
        raise bad_request(f"Missing required parameter: 'input[{i}].{key}' (a string)", f"input[{i}].{key}")
    return value


# ------------------------------------------------------------------ tools
def chat_tools(tools: list[Any] | None) -> list[dict[str, Any]] | None:
    """Flat Responses function tools in chat's nested shape (None: no tools). Built-in tools
    (web_search, file_search, code_interpreter, mcp, ...) are a 400: nothing here runs them."""
    if not tools:
        return None
    return [_chat_tool(tool, i) for i, tool in enumerate(tools)]


def _chat_tool(tool: Any, i: int) -> dict[str, Any]:
    where = f"tools[{i}]"
    require_function_tool(tool, where)
    extra = sorted(set(tool) - _TOOL_KEYS)
    if extra:
        raise bad_request(f"{where}.{extra[0]}: this server does not support the field `{extra[0]}` on function "
                          "tools (Responses tools are flat: type, name, description, parameters, strict)",
                          f"{where}.{extra[0]}")
    if "name" not in tool:
        raise bad_request(f"Missing required parameter: '{where}.name'", f"{where}.name")
    function = {key: tool[key] for key in ("name", "description", "parameters", "strict") if tool.get(key) is not None}
    return {"type": "function", "function": function}


def chat_tool_choice(choice: Any, tools: list[dict[str, Any]] | None) -> Any:
    """`tool_choice` in chat's shape; without tools only "none" / "auto" (the default) are allowed."""
    if isinstance(choice, dict):
        if choice.get("type") != "function" or set(choice) != {"type", "name"} or not isinstance(choice["name"], str):
            raise bad_request(f"Invalid value for 'tool_choice': {choice!r}. Only 'none', 'auto', 'required' or "
                              "{\"type\": \"function\", \"name\": \"my_function\"} are supported.", "tool_choice")
        choice = {"type": "function", "function": {"name": choice["name"]}}
    if tools is None:
        if choice not in (None, "none", "auto"):
            raise bad_request(f"Invalid value for 'tool_choice': {choice!r} needs `tools`.", "tool_choice")
        return None
    return choice


# ------------------------------------------------------------------ text
def response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """`text.format` as chat's `response_format` (None for plain text)."""
    if text is None:
        return None
    extra = sorted(set(text) - {"format", "verbosity"})
    if extra:
        raise bad_request(f"text.{extra[0]}: this server does not support the field `{extra[0]}`", f"text.{extra[0]}")
    if text.get("verbosity") not in (None, "medium"):
        raise bad_request(f"text.verbosity: only the default 'medium' is supported, got {text['verbosity']!r}",
                          "text.verbosity")
    fmt = text.get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind not in _FORMAT_KEYS:
        raise bad_request(f"Invalid 'text.format.type': {kind!r}; expected 'text', 'json_object' or 'json_schema'",
                          "text.format.type")
    extra = sorted(set(fmt) - _FORMAT_KEYS[kind])
    if extra:
        raise bad_request(f"text.format.{extra[0]}: unknown field for format {kind!r}", f"text.format.{extra[0]}")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": _json_schema(fmt)}


def _json_schema(fmt: dict[str, Any]) -> dict[str, Any]:
    name = fmt.get("name")
    if not isinstance(name, str) or not _SCHEMA_NAME.fullmatch(name):
        raise bad_request(f"Invalid 'text.format.name': {name!r} does not match '^[a-zA-Z0-9_-]{{1,64}}$'",
                          "text.format.name")
    if not isinstance(fmt.get("schema"), dict):
        raise bad_request("Missing required parameter: 'text.format.schema' (a JSON schema object)",
                          "text.format.schema")
    return {key: fmt[key] for key in ("name", "schema", "strict", "description") if fmt.get(key) is not None}
