"""Outputs of `tool_choice` "required" and named functions. The grammar engine makes the model
write JSON, not a tool-call format: for "required" an array `[{"name": ..., "parameters": {...}}]`,
for a named function its arguments object alone. These parsers read that JSON into tool calls
(vLLM parses the same JSON in serving_chat.py)."""
from __future__ import annotations


from ascend_llm.server.tool_parsers.abstract_tool_parser import ParsedCall, ParsedText, ToolParser
from ascend_llm.server.tool_parsers.json_scan import (MalformedCall, scan_call_sequence, skip_whitespace,
                                                      strict_loads)


class RequiredToolCallsParser(ToolParser):
    """`tool_choice: "required"`: a JSON array of one or more `{"name", "parameters"}` objects."""

    def parse(self, text: str, final: bool) -> ParsedText:
        start = skip_whitespace(text, 0)
        if start >= len(text):
            return ParsedText(text if final else "")
        if text[start] != "[":
            return ParsedText(text)
        try:
            calls, end = scan_call_sequence(text, start + 1, ",", final, end_char="]")
            if final and text[end:].strip():
                raise MalformedCall("text after the array of calls")
        except MalformedCall:
            return ParsedText(text if final else "")
        return ParsedText("", calls)


class NamedToolCallParser(ToolParser):
    """A named `tool_choice`: the whole output is the arguments of that one function."""

    def __init__(self, name: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.name = name

    def parse(self, text: str, final: bool) -> ParsedText:
        arguments = text.strip() if final else text.lstrip().rstrip()
        if final:
            try:
                if not isinstance(strict_loads(arguments), dict):
                    return ParsedText(text)
            except ValueError:
                return ParsedText(text)
        return ParsedText("", [ParsedCall(self.name, arguments, complete=final)])
