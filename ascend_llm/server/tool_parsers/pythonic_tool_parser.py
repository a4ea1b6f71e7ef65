"""`--tool-call-parser pythonic`: Llama 3.2 / 4 and ToolACE style, the whole output a Python list
of calls with keyword arguments of literal values: `[get_weather(city="SF", days=2), now()]`.
No content beside the calls; arguments become a JSON object (vLLM's pythonic_tool_parser.py).
Streaming sends each call's arguments when the call closes."""
from __future__ import annotations

import ast
import json

from ascend_llm.server.tool_parsers.abstract_tool_parser import ParsedCall, ParsedText, ToolParser
from ascend_llm.server.tool_parsers.json_scan import MalformedCall

_OPEN, _CLOSE = "([{", ")]}"


class PythonicToolParser(ToolParser):
    """A Python list of function calls filling the whole output."""

    def parse(self, text: str, final: bool) -> ParsedText:
        body = text.strip()
        if not body:
            return ParsedText(text if final else "")
        if not body.startswith("["):
            return ParsedText(text)
        try:
            calls = _calls(body, final)
        except MalformedCall:
            return ParsedText(text if final else "")
        return ParsedText("", calls)


def _calls(body: str, final: bool) -> list[ParsedCall]:
    elements, closed, tail_start = _split_elements(body)
    if final and (not closed or not elements):
        raise MalformedCall("not a closed, non-empty list of calls")
    calls = [_call(element) for element in elements]
    if not closed:
        tail = body[tail_start:].strip()
        name = tail.split("(", 1)[0].strip() if "(" in tail else None
        if name and not name.isidentifier():
            raise MalformedCall(f"not a call: {tail!r}")
        if name:
            calls.append(ParsedCall(name))
    return calls


def _split_elements(body: str) -> tuple[list[str], bool, int]:
    """The complete top-level elements of the list `body`, whether the list is closed, and where
    the unfinished element (if any) starts."""
    elements: list[str] = []
    depth, quote, start, i = 0, "", 1, 1
    while i < len(body):
        ch = body[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch in _OPEN:
            depth += 1
        elif ch in _CLOSE and depth > 0:
            depth -= 1
        elif ch in ",]" and depth == 0:
            if body[start:i].strip():
                elements.append(body[start:i])
            if ch == "]":
                if body[i + 1:].strip():
                    raise MalformedCall("text after the list of calls")
                return elements, True, i + 1
            start = i + 1
        i += 1
    return elements, False, start


def _call(element: str) -> ParsedCall:
    try:
        node = ast.parse(element.strip(), mode="eval").body
    except SyntaxError as exc:
        raise MalformedCall(str(exc)) from None
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
        raise MalformedCall(f"not a call with keyword arguments: {element.strip()!r}")
    try:
        arguments = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg is not None}
    except ValueError as exc:
        raise MalformedCall(str(exc)) from None
    try:
        return ParsedCall(node.func.id, json.dumps(arguments, ensure_ascii=False, allow_nan=False), complete=True)
    except (TypeError, ValueError) as exc:      # sets, bytes, complex numbers, inf: not JSON
        raise MalformedCall(str(exc)) from None
