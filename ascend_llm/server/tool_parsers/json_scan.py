"""Incremental scanning of JSON tool-call objects (`{"name": ..., "arguments": {...}}`) in text
that may still be growing: where values start and end, without a partial-JSON library.

A call's arguments are reported as their raw text in the model output, so streamed argument
fragments concatenate to exactly the `arguments` string of the non-streamed response.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from ascend_llm.server.tool_parsers.abstract_tool_parser import ParsedCall

_WHITESPACE = " \t\r\n"
_SCALAR_END = ",}] \t\r\n"
ARGUMENT_KEYS = ("arguments", "parameters")
_STRING_BODY = re.compile(r'[^"\\]*(?:\\.[^"\\]*)*', re.DOTALL)   # a string's characters up to its quote
_STRUCTURE = re.compile(r'["{}\[\]]')                          # what changes depth outside strings


class MalformedCall(ValueError):
    """The text cannot be (the start of) a tool call in this format."""


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def strict_loads(text: str):
    """json.loads without the NaN / Infinity extension Python accepts (clients' parsers do not)."""
    return json.loads(text, parse_constant=_no_constants)


def skip_whitespace(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WHITESPACE:
        pos += 1
    return pos


def scan_string(text: str, pos: int) -> int | None:
    """End (exclusive) of the JSON string starting at `pos` (a quote); None if it has not ended."""
    end = _STRING_BODY.match(text, pos + 1).end()
    return end + 1 if end < len(text) and text[end] == '"' else None


def scan_value(text: str, pos: int) -> int | None:
    """End (exclusive) of the JSON value starting at `pos`; None if the text ends inside it.
    Brackets and strings are matched here; the value's syntax is checked by json.loads later."""
    if pos >= len(text):
        return None
    if text[pos] == '"':
        return scan_string(text, pos)
    if text[pos] not in "{[":
        end = pos
        while end < len(text) and text[end] not in _SCALAR_END:
            end += 1
        return end if end < len(text) and end > pos else None
    depth, i = 0, pos
    while (match := _STRUCTURE.search(text, i)) is not None:
        i = match.start()
        if text[i] == '"':
            end = scan_string(text, i)
            if end is None:
                return None
            i = end
            continue
        depth += 1 if text[i] in "{[" else -1
        i += 1
        if depth == 0:
            return i
    return None


@dataclass
class ScannedCall:
    """A call object scanned from `start`: the call so far and, once closed, where it ends."""
    call: ParsedCall
    end: int | None = None


def scan_call_object(text: str, start: int, name_key: str = "name",
                     argument_keys: tuple[str, ...] = ARGUMENT_KEYS) -> ScannedCall:
    """Scan the call object at `start` (which must be `{`). MalformedCall if it cannot be one."""
    if text[start] != "{":
        raise MalformedCall(f"expected '{{' at {start}")
    call = ParsedCall(name=None)
    name: str | None = None
    pos = start + 1
    while True:
        pos = skip_whitespace(text, pos)
        if pos >= len(text):
            return ScannedCall(_partial(call, name))
        if text[pos] == "}":
            return _closed(text, start, pos + 1, name, call, argument_keys)
        if text[pos] == ",":
            pos += 1
            continue
        key_end = scan_string(text, pos) if text[pos] == '"' else -1
        if key_end == -1:
            raise MalformedCall(f"expected a key at {pos}")
        if key_end is None:
            return ScannedCall(_partial(call, name))
        key = json.loads(text[pos:key_end])
        pos = skip_whitespace(text, key_end)
        if pos >= len(text):
            return ScannedCall(_partial(call, name))
        if text[pos] != ":":
            raise MalformedCall(f"expected ':' at {pos}")
        value_start = skip_whitespace(text, pos + 1)
        value_end = scan_value(text, value_start)
        if key in argument_keys:
            call.arguments = text[value_start:value_end if value_end is not None else len(text)]
        if value_end is None:
            return ScannedCall(_partial(call, name))
        if key == name_key:
            name = json.loads(text[value_start:value_end]) if text[value_start] == '"' else None
            if not isinstance(name, str) or not name:
                raise MalformedCall("the call's name is not a non-empty string")
        pos = value_end


def _partial(call: ParsedCall, name: str | None) -> ParsedCall:
    call.name = name
    return call


def _closed(text: str, start: int, end: int, name: str | None, call: ParsedCall,
            argument_keys: tuple[str, ...]) -> ScannedCall:
    try:
        obj = strict_loads(text[start:end])
    except ValueError as exc:
        raise MalformedCall(str(exc)) from None
    if name is None or sum(key in obj for key in argument_keys) > 1:
        raise MalformedCall("a call needs a name and one arguments object")
    if not any(key in obj for key in argument_keys):
        call.arguments = "{}"
    elif not isinstance(obj[next(k for k in argument_keys if k in obj)], dict):
        raise MalformedCall("the call's arguments are not a JSON object")
    return ScannedCall(ParsedCall(name, call.arguments, complete=True), end)


def scan_call_sequence(text: str, pos: int, separator: str, final: bool,
                       end_char: str | None = None) -> tuple[list[ParsedCall], int]:
    """Call objects from `pos`, separated by `separator` and closed by `end_char` (a JSON array's
    `]`) or the end of the text; returns the calls and where scanning stopped. MalformedCall on
    anything else (in `final` mode also on an unfinished call or array)."""
    calls: list[ParsedCall] = []
    while True:
        pos = skip_whitespace(text, pos)
        if pos >= len(text):
            if final and (end_char is not None or not calls):
                raise MalformedCall("the calls are unfinished")
            return calls, pos
        if end_char is not None and text[pos] == end_char and calls:
            return calls, pos + 1
        scanned = scan_call_object(text, pos)
        calls.append(scanned.call)
        if scanned.end is None:
            if final:
                raise MalformedCall("a call is unfinished")
            return calls, len(text)
        pos = skip_whitespace(text, scanned.end)
        if pos < len(text) and text[pos] == separator:
            pos += 1
        elif pos < len(text) and text[pos] != end_char:
            raise MalformedCall(f"unexpected {text[pos]!r} after a call")
