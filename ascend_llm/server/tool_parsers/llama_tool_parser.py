"""`--tool-call-parser llama3_json` (and `llama4_json`): Llama 3.1+ JSON tool calls. The whole
output is `{"name": ..., "parameters": {...}}` (or `"arguments"`), optionally after
`<|python_tag|>`, several calls separated by `;`; there is no content beside the calls
(vLLM's llama_tool_parser.py)."""
from __future__ import annotations

from ascend_llm.server.tool_parsers.abstract_tool_parser import ParsedText, ToolParser
from ascend_llm.server.tool_parsers.json_scan import MalformedCall, scan_call_sequence, skip_whitespace

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    """`;`-separated JSON call objects filling the whole output."""

    def parse(self, text: str, final: bool) -> ParsedText:
        start = skip_whitespace(text, 0)
        if text.startswith(PYTHON_TAG, start):
            start = skip_whitespace(text, start + len(PYTHON_TAG))
        elif not final and PYTHON_TAG.startswith(text[start:]):
            return ParsedText("")           # nothing yet, or the start of the tag
        if start < len(text) and text[start] != "{":
            return ParsedText(text)
        if start >= len(text):
            return ParsedText(text if final else "")
        try:
            calls, _ = scan_call_sequence(text, start, ";", final)
        except MalformedCall:
            return ParsedText(text if final else "")
        return ParsedText("", calls)
