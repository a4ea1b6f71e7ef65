"""`--tool-call-parser hermes`: Hermes 2 Pro, Qwen2.5 / QwQ / Qwen3 (JSON tool calls):
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call, any text before
the first block is the message content (vLLM's hermes_tool_parser.py)."""
from __future__ import annotations

from ascend_llm.server.tool_parsers.abstract_tool_parser import ParsedCall, ParsedText, ToolParser, held_back
from ascend_llm.server.tool_parsers.json_scan import MalformedCall, scan_call_object, skip_whitespace


class Hermes2ProToolParser(ToolParser):
    """JSON calls wrapped in `<tool_call>` ... `</tool_call>`."""

    start_tag = "<tool_call>"
    end_tag = "</tool_call>"

    def parse(self, text: str, final: bool) -> ParsedText:
        first = text.find(self.start_tag)
        if first < 0:
            return ParsedText(text if final else held_back(text, (self.start_tag,)).rstrip())
        content = self.clean_content(text[:first])
        try:
            calls = self._calls(text, first, final)
        except MalformedCall:
            return ParsedText(text if final else content)
        if final and not calls:
            return ParsedText(text)
        return ParsedText(content, calls)

    def clean_content(self, content: str) -> str:
        return content.rstrip()

    def _calls(self, text: str, pos: int, final: bool) -> list[ParsedCall]:
        calls: list[ParsedCall] = []
        while pos >= 0:
            body = skip_whitespace(text, pos + len(self.start_tag))
            if body >= len(text):
                if final:
                    raise MalformedCall("an empty tool call block")
                return calls
            scanned = scan_call_object(text, body)
            calls.append(scanned.call)
            if scanned.end is None:
                if final:
                    raise MalformedCall("an unfinished tool call")
                return calls
            after = skip_whitespace(text, scanned.end)
            rest = text[after:after + len(self.end_tag)]
            if not self.end_tag.startswith(rest) or (final and rest and rest != self.end_tag):
                raise MalformedCall(f"expected {self.end_tag} after a call")
            pos = text.find(self.start_tag, after)
        return calls
