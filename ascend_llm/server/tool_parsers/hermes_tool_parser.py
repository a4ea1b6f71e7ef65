"""`--tool-call-parser hermes`: Hermes 2 Pro, Qwen2.5 / QwQ / Qwen3 (JSON tool calls):
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call, any text before
the first block is the message content (vLLM's hermes_tool_parser.py)."""
from __future__ import annotations

from ascend_llm.server.tool_parsers.abstract_tool_parser import ParsedCall
from ascend_llm.server.tool_parsers.json_scan import MalformedCall, scan_call_object, skip_whitespace
from ascend_llm.server.tool_parsers.marked_calls import MarkedCallsParser


class Hermes2ProToolParser(MarkedCallsParser):
    """JSON calls wrapped in `<tool_call>` ... `</tool_call>`."""

    start_tag = "<tool_call>"
    end_tag = "</tool_call>"
    call_markers = (start_tag,)

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
