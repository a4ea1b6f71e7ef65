"""JSON schemas that make the grammar engine write valid tool calls for `tool_choice` "required"
(an array of one or more `{"name", "parameters"}` objects, one branch per tool) and a named
function (its parameters object), as vLLM builds them (protocol.py `_get_json_schema_from_tool`,
tool_parsers/utils.py `get_json_schema_from_tools`)."""
from __future__ import annotations

import copy
from typing import Any

EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def tool_parameters(tool: dict[str, Any]) -> dict[str, Any]:
    """A function tool's parameters schema (an empty object schema when it declares none)."""
    parameters = tool["function"].get("parameters")
    return copy.deepcopy(parameters) if parameters else dict(EMPTY_PARAMETERS)


def named_tool_schema(tool: dict[str, Any]) -> dict[str, Any]:
    """The schema of a call to this one function: its arguments object."""
    return tool_parameters(tool)


def required_tools_schema(tools: list[dict[str, Any]], parallel: bool = True) -> dict[str, Any]:
    """The schema of one or more calls to any of `tools` (just one when not `parallel`).
    `$defs` of the tools' schemas move to the top so their `$ref`s still resolve; a name defined
    differently by two tools is a ValueError."""
    branches, defs = [], {}
    for tool in tools:
        parameters = tool_parameters(tool)
        for name, schema in parameters.pop("$defs", {}).items():
            if name in defs and defs[name] != schema:
                raise ValueError(f"tools: the $defs entry {name!r} has different schemas in two tools")
            defs[name] = schema
        branches.append({"properties": {"name": {"type": "string", "enum": [tool["function"]["name"]]},
                                        "parameters": parameters},
                         "required": ["name", "parameters"]})
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": {"type": "object", "anyOf": branches}}
    if not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema
