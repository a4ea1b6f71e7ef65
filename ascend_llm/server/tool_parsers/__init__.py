"""Tool-call parsers by vLLM's `--tool-call-parser` names: model text -> OpenAI tool calls."""
from __future__ import annotations

from ascend_llm.server.tool_parsers.abstract_tool_parser import (ExtractedToolCalls, ParsedCall, ParsedText,
                                                                 StreamDelta, ToolParser, make_tool_call_id)
from ascend_llm.server.tool_parsers.ernie45_tool_parser import Ernie45ToolParser
from ascend_llm.server.tool_parsers.forced_tool_parser import NamedToolCallParser, RequiredToolCallsParser
from ascend_llm.server.tool_parsers.hermes_tool_parser import Hermes2ProToolParser
from ascend_llm.server.tool_parsers.llama_tool_parser import Llama3JsonToolParser
from ascend_llm.server.tool_parsers.mistral_tool_parser import MistralToolParser
from ascend_llm.server.tool_parsers.pythonic_tool_parser import PythonicToolParser
from ascend_llm.server.tool_parsers.qwen3coder_tool_parser import Qwen3CoderToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": Hermes2ProToolParser,
    "llama3_json": Llama3JsonToolParser,
    "llama4_json": Llama3JsonToolParser,
    "mistral": MistralToolParser,
    "pythonic": PythonicToolParser,
    "qwen3_coder": Qwen3CoderToolParser,
    "qwen3_xml": Qwen3CoderToolParser,
    "ernie45": Ernie45ToolParser,
}


def get_tool_parser(name: str) -> type[ToolParser]:
    """The parser class registered as `name`; ValueError listing the names otherwise."""
    try:
        return TOOL_PARSERS[name]
    except KeyError:
        raise ValueError(f"tool_call_parser: unknown parser {name!r}; choose from "
                         f"{', '.join(sorted(TOOL_PARSERS))}") from None


__all__ = ["TOOL_PARSERS", "ExtractedToolCalls", "NamedToolCallParser", "ParsedCall", "ParsedText",
           "RequiredToolCallsParser", "StreamDelta", "ToolParser", "get_tool_parser", "make_tool_call_id"]
