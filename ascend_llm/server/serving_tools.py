"""Tool calling on /v1/chat/completions: validation of `tools` / `tool_choice` /
`parallel_tool_calls` (unknown keys a 400 naming their path), and the parser that turns each
choice's output into OpenAI tool calls (vLLM's serving_chat.py and protocol.py). Tool-call messages
in the shape chat templates expect are built in chat_messages.py.

`tool_choice` "none" renders the tools but parses nothing; "auto" needs the server's
`--enable-auto-tool-choice --tool-call-parser NAME` and parses that format; "required" and a named
function set a JSON schema the grammar engine enforces, and the JSON it yields is read directly.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ascend_llm.sampling_params import StructuredOutputsParams
from ascend_llm.server.args import ServerConfig
from ascend_llm.server.errors import bad_request, check_keys
from ascend_llm.server.protocol import ChatCompletionRequest
from ascend_llm.server.tool_choice_schema import named_tool_schema, required_tools_schema
from ascend_llm.server.tool_parsers import (NamedToolCallParser, RequiredToolCallsParser, ToolParser,
                                            get_tool_parser)

FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")     # OpenAI's rule for function names
AUTO_NEEDS_FLAGS = ('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser '
                    'to be set')
_CHOICES = ("none", "auto", "required")
_TOOL_KEYS = {"type", "function"}                                   # also a named tool_choice's keys
_FUNCTION_KEYS = {"name", "description", "parameters", "strict"}    # OpenAI's FunctionDefinition
_NAMED_USAGE = 'Correct usage: `{"type": "function", "function": {"name": "my_function"}}`'


@dataclass
class ToolRequest:
    """A chat request's validated tool settings."""
    tools: list[dict[str, Any]]
    choice: str                         # "none" | "auto" | "required" | "function" (named)
    function_name: str | None
    parallel: bool
    parser_cls: type[ToolParser] | None
    in_prompt: bool = True              # False: "none" with --exclude-tools-when-tool-choice-none

    @property
    def prompt_tools(self) -> list[dict[str, Any]] | None:
        """The tools the chat template renders (None: left out)."""
        return self.tools if self.in_prompt else None

    def new_parser(self) -> ToolParser | None:
        """A fresh parser for one choice (None for "none": the output is plain content)."""
        if self.choice == "required":
            return RequiredToolCallsParser(tools=self.tools, parallel=self.parallel)
        if self.choice == "function":
            return NamedToolCallParser(self.function_name, tools=self.tools, parallel=self.parallel)
        if self.choice == "auto" and self.parser_cls is not None:
            return self.parser_cls(tools=self.tools, parallel=self.parallel)
        return None

    def structured_outputs(self) -> StructuredOutputsParams | None:
        """The grammar constraint of "required" / a named function; None for "none" / "auto"."""
        if self.choice == "required":
            return StructuredOutputsParams(json=required_tools_schema(self.tools, self.parallel))
        if self.choice == "function":
            tool = next(t for t in self.tools if t["function"]["name"] == self.function_name)
            return StructuredOutputsParams(json=named_tool_schema(tool))
        return None

    @property
    def keep_special_tokens(self) -> bool:
        """Whether the parser's markers are special tokens detokenization must not drop."""
        return self.choice == "auto" and self.parser_cls is not None and self.parser_cls.needs_special_tokens

    def finish_reason(self, reason: str | None, tools_called: bool) -> str | None:
        """The finish reason to report: `tool_calls` when calls ended the output of "auto" or
        "required" (a named function keeps `stop`, as OpenAI answers)."""
        if tools_called and reason == "stop" and self.choice in ("auto", "required"):
            return "tool_calls"
        return reason


def resolve_tools(req: ChatCompletionRequest, config: ServerConfig) -> ToolRequest | None:
    """The request's tool settings (None without tools); 400 naming the field on bad input."""
    if req.functions is not None or req.function_call is not None:
        param = "functions" if req.functions is not None else "function_call"
        raise bad_request(f"{param}: the deprecated `functions` / `function_call` fields are not supported; "
                          "use `tools` / `tool_choice`", param)
    if req.tools is None or (not req.tools and req.tool_choice in (None, "none", "auto", "required")):
        if req.tool_choice is not None and req.tools is None:
            raise bad_request("Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' "
                              "are specified.", "tool_choice")
        return None
    tools = check_tools(req.tools)
    choice, name = _check_tool_choice(req.tool_choice, tools)
    if choice == "auto" and not (config.enable_auto_tool_choice and config.tool_call_parser):
        raise bad_request(AUTO_NEEDS_FLAGS, "tool_choice")
    parser_cls = get_tool_parser(config.tool_call_parser) if config.tool_call_parser else None
    parallel = True if req.parallel_tool_calls is None else bool(req.parallel_tool_calls)
    in_prompt = not (choice == "none" and config.exclude_tools_when_tool_choice_none)
    return ToolRequest(tools, choice, name, parallel, parser_cls, in_prompt)


def check_tools(tools: list[Any]) -> list[dict[str, Any]]:
    """Validated function tools in the shape chat templates take; 400 naming `tools[i]...`."""
    return [_check_tool(tool, i) for i, tool in enumerate(tools)]


def require_function_tool(tool: Any, where: str) -> dict[str, Any]:
    """`tool` if it is an object of type "function" (chat's or Responses' shape), else a 400 naming
    `where` / `where.type`: built-in tools (web_search, file_search, ...) have nothing to run them here."""
    if not isinstance(tool, dict):
        raise bad_request(f"Invalid '{where}': expected an object", where)
    if tool.get("type") != "function":
        raise bad_request(f"Invalid '{where}.type': {tool.get('type')!r} tools are not supported by this server; "
                          "only 'function' tools (the client runs them)", f"{where}.type")
    return tool


def _check_tool(tool: Any, i: int) -> dict[str, Any]:
    where = f"tools[{i}]"
    check_keys(require_function_tool(tool, where), _TOOL_KEYS, where)
    function = tool.get("function")
    if not isinstance(function, dict):
        raise bad_request(f"Missing required parameter: '{where}.function'", f"{where}.function")
    check_keys(function, _FUNCTION_KEYS, f"{where}.function")
    name = function.get("name")
    if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
        raise bad_request(f"Invalid '{where}.function.name': {name!r} does not match the pattern "
                          f"'^[a-zA-Z0-9_-]{{1,64}}$'", f"{where}.function.name")
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise bad_request(f"Invalid '{where}.function.description': expected a string",
                          f"{where}.function.description")
    parameters = function.get("parameters")
    if parameters is not None:
        _check_parameters(parameters, f"{where}.function.parameters")
    return {"type": "function", "function": {k: v for k, v in function.items() if v is not None}}


def _check_parameters(schema: Any, where: str) -> None:
    """A function's parameters must be a JSON-schema object (type "object", well-formed keywords)."""
    if not isinstance(schema, dict):
        raise bad_request(f"Invalid '{where}': expected a JSON schema object, got {type(schema).__name__}",
                          where)
    if schema.get("type", "object") != "object":
        raise bad_request(f"Invalid '{where}': the schema's type must be 'object', got {schema['type']!r}",
                          where)
    properties = schema.get("properties", {})
    if not isinstance(properties, dict) or not all(isinstance(v, (dict, bool)) for v in properties.values()):
        raise bad_request(f"Invalid '{where}.properties': expected an object of JSON schemas", where)
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise bad_request(f"Invalid '{where}.required': expected a list of property names", where)
    for key in ("$defs", "definitions"):
        if key in schema and not isinstance(schema[key], dict):
            raise bad_request(f"Invalid '{where}.{key}': expected an object of JSON schemas", where)


def _check_tool_choice(value: Any, tools: list[dict[str, Any]]) -> tuple[str, str | None]:
    if value is None:
        return "auto", None
    if isinstance(value, str):
        if value not in _CHOICES:
            raise bad_request(f"Invalid value for `tool_choice`: {value!r}! Only named tools, \"none\", "
                              "\"auto\" or \"required\" are supported.", "tool_choice")
        return value, None
    function = value.get("function") if isinstance(value, dict) else None
    if not isinstance(value, dict) or value.get("type", "function") != "function" or not isinstance(function, dict):
        raise bad_request(f"Invalid value for `tool_choice`: {value!r}. {_NAMED_USAGE}", "tool_choice")
    check_keys(value, _TOOL_KEYS, "tool_choice")
    check_keys(function, {"name"}, "tool_choice.function")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise bad_request(f"Expected field `name` in `function` in `tool_choice`! {_NAMED_USAGE}", "tool_choice")
    if all(tool["function"]["name"] != name for tool in tools):
        raise bad_request(f"tool_choice: the function {name!r} does not match any of the specified `tools`",
                          "tool_choice")
    return "function", name
