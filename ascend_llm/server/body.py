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
        raise _validation_error(exc) from None


def _validation_error(exc: ValidationError) -> APIError:
    first = exc.errors(include_url=False)[0]
    loc = [str(part) for part in first.get("loc", ())]
    param = ".".join(loc) if loc else None
    top = loc[0] if loc else None
    if first.get("type") == "extra_forbidden":
        return bad_request(f"{param}: this server does not support the request field `{loc[-1]}`", top)
    return bad_request(f"{param or 'body'}: {first.get('msg', 'invalid value')}", top if top else param)


async def parse_request(request: Request, model: type[ModelT], max_bytes: int) -> ModelT:
    """Read, parse and validate a JSON request body."""
    return validate(model, parse_json(await read_body(request, max_bytes)))
