"""`--tool-call-parser ernie45`: ERNIE-4.5 writes hermes-style `<tool_call>` JSON blocks; answers
without calls may be wrapped in `<response>` ... `</response>`, which is not content (vLLM's
ernie45_tool_parser.py)."""
from __future__ import annotations

from ascend_llm.server.tool_parsers.abstract_tool_parser import ParsedText, held_back
from ascend_llm.server.tool_parsers.hermes_tool_parser import Hermes2ProToolParser

_RESPONSE_TAGS = ("<response>", "</response>")


class Ernie45ToolParser(Hermes2ProToolParser):
    """Hermes blocks; `<response>` tags and the newlines around the content are dropped."""

    def parse(self, text: str, final: bool) -> ParsedText:
        parsed = super().parse(text, final)
        content = parsed.content if final else held_back(parsed.content, _RESPONSE_TAGS)
        content = _strip_response_tags(content)
        return ParsedText(content.strip("\n") if final else content.lstrip("\n").rstrip(), parsed.calls)


def _strip_response_tags(text: str) -> str:
    for tag in _RESPONSE_TAGS:
        text = text.replace(tag, "")
    return text
