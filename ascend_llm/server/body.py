"""Reading request bodies defensively: size limit (413), malformed or deeply nested JSON (400),
and pydantic validation errors mapped to a 400 naming the parameter."""
from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from ascend_llm.server.errors import APIError, bad_request

ModelT = TypeVar("ModelT", bound=BaseModel)

MAX_JSON_DEPTH = 32


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The raw body; 413 as soon as it (declared or streamed) exceeds `max_bytes`."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise bad_request("invalid Content-Length header")
        if int(declared) > max_bytes:
            raise _too_large(max_bytes)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(max_bytes: int) -> APIError:
    return APIError(413, f"request body is larger than the limit of {max_bytes} bytes")


def parse_json(raw: bytes) -> Any:
    """JSON value of `raw`; 400 for empty, malformed, non-UTF-8 or too deeply nested input."""
    if not raw.strip():
        raise bad_request("the request body is empty; expected a JSON object")
    try:
        value = json.loads(raw)
    except RecursionError:
        raise bad_request(f"JSON is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad_request(f"malformed JSON body: {exc}") from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise bad_request(f"JSON is nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def json_depth(value: Any) -> int:
    """Nesting depth of containers (iterative, so hostile input cannot exhaust the stack)."""
    depth, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        depth = max(depth, level)
        if depth > MAX_JSON_DEPTH:
            return depth
        stack.extend((child, level + 1) for child in children)
    return depth


def validate(model: type[ModelT], data: Any) -> ModelT:
    """`model` from parsed JSON; the first validation error becomes a 400 naming its field."""
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def validation_error(exc: ValidationError) -> APIError:
    """A 400 naming the full path of the offending field (`messages[2].foo`, `stream_options.bogus`), as
    OpenAI's `param` does. Of the errors pydantic reports (one per union branch), the deepest is kept:
    it is the branch the client meant (a list of content parts, not a string)."""
    error = max(exc.errors(include_url=False), key=_depth)      # the first of the deepest
    param = field_path(error.get("loc", ())) or None
    if error.get("type") == "extra_forbidden":
        name = error["loc"][-1]
        return bad_request(f"{param}: this server does not support the request field `{name}`", param)
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    return bad_request(f"{param or 'body'}: {message}", param)


def field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    """`("messages", 2, "content", "list[ContentPart]", 0, "type")` -> `messages[2].content[0].type`
    (pydantic's union-branch tags dropped)."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not _is_union_tag(part):
            path += f".{part}" if path else str(part)
    return path


def _depth(error: Any) -> int:
    return sum(not _is_union_tag(part) for part in error.get("loc", ()))


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none", "any"})


def _is_union_tag(part: Any) -> bool:
    """Whether a loc element names a union branch (`str`, `list[ContentPart]`, ...), not a field."""
    return isinstance(part, str) and ("[" in part or part in _TYPE_TAGS)


async def parse_request(request: Request, model: type[ModelT], max_bytes: int) -> ModelT:
    """Read, parse and validate a JSON request body."""
    return validate(model, parse_json(await read_body(request, max_bytes)))
