"""Formats whose tool calls follow free content from the first call marker on (hermes, qwen3_coder):
the text before the first marker is content, the rest must be calls; one `parse` serves them."""
from __future__ import annotations

from ascend_llm.server.tool_parsers.abstract_tool_parser import ParsedCall, ParsedText, ToolParser, held_back
from ascend_llm.server.tool_parsers.json_scan import MalformedCall


class MarkedCallsParser(ToolParser):
    """`parse` for content + marked calls; subclasses give `call_markers` and `_calls`."""

    call_markers: tuple[str, ...] = ()

    def parse(self, text: str, final: bool) -> ParsedText:
        first = self.first_call(text)
        if first < 0:
            return ParsedText(text if final else held_back(text, self.call_markers).rstrip())
        content = self.clean_content(text[:first])
        try:
            calls = self._calls(text, first, final)
        except MalformedCall:
            return ParsedText(text if final else content)
        if final and not calls:
            return ParsedText(text)
        return ParsedText(content, calls)

    def first_call(self, text: str) -> int:
        """Where the first call starts (the earliest of `call_markers`), -1 if none yet."""
        starts = [i for i in (text.find(marker) for marker in self.call_markers) if i >= 0]
        return min(starts) if starts else -1

    def clean_content(self, content: str) -> str:
        return content.rstrip()

    def _calls(self, text: str, pos: int, final: bool) -> list[ParsedCall]:
        """The calls from `pos` (a marker) on; MalformedCall when the text cannot be calls."""
        raise NotImplementedError
