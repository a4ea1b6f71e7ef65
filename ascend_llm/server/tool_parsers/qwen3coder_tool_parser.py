"""`--tool-call-parser qwen3_coder` (also `qwen3_xml`): Qwen3-Coder / Qwen3.5 XML calls,

    <tool_call>
    <function=get_weather>
    <parameter=city>
    San Francisco
    </parameter>
    </function>
    </tool_call>

Parameter values are text, typed by the tool's JSON schema (string, integer, number, boolean,
object / array as JSON); text before the first call is the content (vLLM's
qwen3coder_tool_parser.py). Streaming sends the arguments object one finished parameter at a time.
"""
from __future__ import annotations

import ast
import json
import math
import re
from typing import Any

from ascend_llm.server.tool_parsers.abstract_tool_parser import ParsedCall
from ascend_llm.server.tool_parsers.json_scan import MalformedCall
from ascend_llm.server.tool_parsers.marked_calls import MarkedCallsParser

TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
FUNCTION_END, PARAMETER_END = "</function>", "</parameter>"
_FUNCTION = re.compile(r"<function=([^>\n]+)>")
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>")
_STRING_TYPES = ("string", "str", "text", "varchar", "char", "enum")


class Qwen3CoderToolParser(MarkedCallsParser):
    """`<tool_call><function=NAME><parameter=P>value</parameter>...</function></tool_call>`."""

    call_markers = (TOOL_CALL_START, "<function=")   # some models write a bare `<function=`

    def _calls(self, text: str, pos: int, final: bool) -> list[ParsedCall]:
        calls: list[ParsedCall] = []
        while True:
            match = _FUNCTION.search(text, pos)
            if match is None:
                if final and not calls:
                    raise MalformedCall("no <function=...> in a tool call")
                return calls
            name = match.group(1).strip()
            end = text.find(FUNCTION_END, match.end())
            body = text[match.end():end if end >= 0 else len(text)]
            arguments = self._arguments(name, body, complete=end >= 0)
            if end < 0 and final:
                raise MalformedCall("an unfinished function")
            calls.append(ParsedCall(name, arguments, complete=end >= 0))
            if end < 0:
                return calls
            pos = end + len(FUNCTION_END)

    def _arguments(self, name: str, body: str, complete: bool) -> str:
        """The arguments JSON: all of it for a finished function, else the finished parameters'
        part without the closing brace (a prefix of the final text)."""
        schema = self.tool_parameters(name)
        values: dict[str, Any] = {}
        for match in _PARAMETER.finditer(body):
            end = body.find(PARAMETER_END, match.end())
            if end < 0:
                next_param = _PARAMETER.search(body, match.end())
                if not complete:
                    break
                end = next_param.start() if next_param else len(body)
            key = match.group(1).strip()
            values[key] = convert_param_value(_strip_newline(body[match.end():end]), schema.get(key))
        text = json.dumps(values, ensure_ascii=False)
        return text if complete else text[:-1]


def _strip_newline(value: str) -> str:
    value = value[1:] if value.startswith("\n") else value
    return value[:-1] if value.endswith("\n") else value


def convert_param_value(value: str, schema: Any) -> Any:
    """A parameter's text typed by its JSON schema (untyped or unknown parameters stay text)."""
    if value.lower() == "null":
        return None
    kind = str(schema.get("type", "string")).lower() if isinstance(schema, dict) else "string"
    if isinstance(schema, dict) and "type" not in schema and ("anyOf" in schema or "oneOf" in schema):
        kind = "object"
    try:
        if kind in _STRING_TYPES:
            return value
        if kind.startswith(("int", "uint", "long", "short", "unsigned")):
            return int(value)
        if kind.startswith(("num", "float")):
            number = float(value)
            if not math.isfinite(number):           # JSON has no inf / nan: keep the text
                return value
            return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() \
                else number
        if kind in ("boolean", "bool", "binary"):
            return value.strip().lower() == "true"
        if kind.startswith(("object", "array", "arr", "dict", "list")):
            return json.loads(value)
    except (ValueError, TypeError):
        return value
    try:
        result = ast.literal_eval(value)
        json.dumps(result, allow_nan=False)
        return result
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return value
