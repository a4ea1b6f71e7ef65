"""`--tool-call-parser mistral`: Mistral 7B v0.3 / Nemo / Small. After the `[TOOL_CALLS]` special
token comes either a JSON array of `{"name", "arguments"}` objects (tokenizers before v11) or
`name{arguments}` per call, each call after its own `[TOOL_CALLS]` (v11+). Text before the first
`[TOOL_CALLS]` is the content. Tool call ids are 9 alphanumerics, as Mistral templates require
(vLLM's mistral_tool_parser.py)."""
from __future__ import annotations

import random
import re
import string

from ascend_llm.server.tool_parsers.abstract_tool_parser import ParsedCall, ParsedText, ToolParser, held_back
from ascend_llm.server.tool_parsers.json_scan import (MalformedCall, scan_call_sequence, scan_value,
                                                      skip_whitespace, strict_loads)

BOT_TOKEN = "[TOOL_CALLS]"
_ID_CHARS = string.ascii_letters + string.digits
_NAME = re.compile(r"[A-Za-z0-9_-]+")


class MistralToolParser(ToolParser):
    """`[TOOL_CALLS]` then a JSON array of calls, or `name{...}` per call."""

    needs_special_tokens = True

    def new_call_id(self) -> str:
        return "".join(random.choices(_ID_CHARS, k=9))

    def parse(self, text: str, final: bool) -> ParsedText:
        first = text.find(BOT_TOKEN)
        if first < 0:
            return ParsedText(text if final else held_back(text, (BOT_TOKEN,)).rstrip())
        content = text[:first].rstrip()
        body = skip_whitespace(text, first + len(BOT_TOKEN))
        try:
            if body >= len(text):
                if final:
                    raise MalformedCall("nothing after [TOOL_CALLS]")
                calls: list[ParsedCall] = []
            elif text[body] == "[":
                calls, end = scan_call_sequence(text, body + 1, ",", final, end_char="]")
                if final and text[end:].strip():
                    raise MalformedCall("text after the calls")
            else:
                calls = _named_calls(text, first, final)
        except MalformedCall:
            return ParsedText(text if final else content)
        return ParsedText(content, calls)


def _named_calls(text: str, pos: int, final: bool) -> list[ParsedCall]:
    """v11+ calls: `[TOOL_CALLS]name{json}` repeated."""
    calls: list[ParsedCall] = []
    while pos >= 0:
        start = skip_whitespace(text, pos + len(BOT_TOKEN))
        match = _NAME.match(text, start)
        name_end = match.end() if match else start
        if name_end >= len(text):
            if final:
                raise MalformedCall("a call without arguments")
            return calls
        if match is None or text[name_end] != "{":
            raise MalformedCall(f"expected name{{arguments}} at {start}")
        end = scan_value(text, name_end)
        if end is None:
            if final:
                raise MalformedCall("unfinished arguments")
            calls.append(ParsedCall(match.group(), text[name_end:]))
            return calls
        try:
            strict_loads(text[name_end:end])
        except ValueError as exc:
            raise MalformedCall(str(exc)) from None
        calls.append(ParsedCall(match.group(), text[name_end:end], complete=True))
        rest = text[end:].lstrip()
        if rest and not rest.startswith(BOT_TOKEN) and not (not final and BOT_TOKEN.startswith(rest)):
            raise MalformedCall("text after a call")
        pos = text.find(BOT_TOKEN, end)
    return calls
