"""The tool-parser interface: model text -> OpenAI tool calls, whole or as streamed deltas.

A parser implements one method, `parse(text, final)`: the content that is surely not a tool
call and the calls found so far. With `final=False` (streaming) the text may still grow, so
everything returned must stay a prefix of what a longer text would give: content that could
still turn out to be the start of a call marker is held back, and a call's `arguments` holds
only argument text that can no longer change. With `final=True` the text is complete and the
parse is all-or-nothing: malformed call text makes the whole output plain content (as vLLM does).
Everything else (ids, deltas, `parallel_tool_calls`) lives here, once for every format.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from ascend_llm.server.protocol import DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall


def make_tool_call_id() -> str:
    """An OpenAI-style tool call id (`call_` + 24 hex digits)."""
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ParsedCall:
    """A tool call as far as the text shows it: `name` None until complete, `arguments` the
    JSON text of the arguments known so far (all of it once `complete`)."""
    name: str | None
    arguments: str = ""
    complete: bool = False


@dataclass
class ParsedText:
    """What `ToolParser.parse` found: the plain content and the calls, in order."""
    content: str
    calls: list[ParsedCall] = field(default_factory=list)


@dataclass
class ExtractedToolCalls:
    """A finished output split into content (None when only calls remain) and tool calls."""
    content: str | None
    tool_calls: list[ToolCall]

    @property
    def tools_called(self) -> bool:
        return bool(self.tool_calls)


@dataclass
class StreamDelta:
    """What one streamed chunk adds: content text and / or tool-call deltas."""
    content: str = ""
    tool_calls: list[DeltaToolCall] = field(default_factory=list)


class ToolParser:
    """Base of every tool-call format. One instance per choice of one request (it keeps the
    streaming state). `tools` are the request's tool definitions (OpenAI shape); `parallel`
    False keeps only the first call (`parallel_tool_calls: false`)."""

    # whether the format's markers are special tokens that detokenization must keep
    needs_special_tokens: bool = False

    def __init__(self, tools: list[dict[str, Any]] | None = None, parallel: bool = True) -> None:
        self.tools = tools or []
        self.parallel = parallel
        self._text = ""
        self._sent_content = ""
        self._sent_ids: list[str] = []
        self._sent_args: list[int] = []

    # ------------------------------------------------------------ per format
    def parse(self, text: str, final: bool) -> ParsedText:
        """Split `text` into content and calls (see the module docstring for `final`)."""
        raise NotImplementedError

    # ------------------------------------------------------------ whole text
    def extract_tool_calls(self, text: str) -> ExtractedToolCalls:
        """The tool calls in a finished output; without calls all of it is content."""
        parsed = self.parse(text, final=True)
        calls = self._limit([c for c in parsed.calls if c.complete and c.name])
        if not calls:
            return ExtractedToolCalls(parsed.content, [])
        tool_calls = [ToolCall(id=self.new_call_id(), function=FunctionCall(name=c.name, arguments=c.arguments))
                      for c in calls]
        return ExtractedToolCalls(parsed.content if parsed.content.strip() else None, tool_calls)

    # -------------------------------------------------------------- streamed
    def extract_tool_calls_streaming(self, delta_text: str, final: bool = False) -> StreamDelta:
        """Feed the next piece of output; what to send now. `final` on the last piece."""
        self._text += delta_text
        parsed = self.parse(self._text, final)
        delta = StreamDelta()
        # content only ever grows; a final re-reading of sent calls as plain text is not resent
        if parsed.content.startswith(self._sent_content) and (parsed.calls or not self._sent_ids):
            delta.content = parsed.content[len(self._sent_content):]
            self._sent_content = parsed.content
        for index, call in enumerate(self._limit(parsed.calls)):
            if call.name is None:
                break
            if index == len(self._sent_ids):
                self._sent_ids.append(self.new_call_id())
                self._sent_args.append(len(call.arguments))
                delta.tool_calls.append(DeltaToolCall(index=index, id=self._sent_ids[index], type="function",
                                                      function=DeltaFunctionCall(name=call.name,
                                                                                 arguments=call.arguments)))
            elif len(call.arguments) > self._sent_args[index]:
                delta.tool_calls.append(DeltaToolCall(index=index, function=DeltaFunctionCall(
                    arguments=call.arguments[self._sent_args[index]:])))
                self._sent_args[index] = len(call.arguments)
        return delta

    @property
    def tools_called(self) -> bool:
        """Whether streaming has sent at least one tool call."""
        return bool(self._sent_ids)

    def _limit(self, calls: list[ParsedCall]) -> list[ParsedCall]:
        return calls if self.parallel else calls[:1]

    # ----------------------------------------------------------------- shared
    def new_call_id(self) -> str:
        """The id of a new tool call (formats whose templates check ids override it)."""
        return make_tool_call_id()

    def tool_parameters(self, name: str) -> dict[str, Any]:
        """The JSON schema `properties` of tool `name` ({} if unknown)."""
        for tool in self.tools:
            function = tool.get("function") or {}
            if function.get("name") == name:
                return (function.get("parameters") or {}).get("properties") or {}
        return {}


def held_back(text: str, markers: tuple[str, ...]) -> str:
    """`text` without a tail that could be the start of one of `markers` (streaming holds it back)."""
    for cut in range(max(len(m) for m in markers) - 1, 0, -1):
        if len(text) >= cut and any(m.startswith(text[-cut:]) for m in markers):
            return text[:-cut]
    return text
