"""The JSON schemas behind `tool_choice` "required" and named functions, compiled by xgrammar (the
grammar engine) and run through a GrammarMatcher over a real tokenizer: valid calls are accepted,
wrong names, missing arguments, empty arrays and extra calls are not (schemas as vLLM builds them,
protocol.py `_get_json_schema_from_tool`, tool_parsers/utils.py `get_json_schema_from_tools`)."""
from __future__ import annotations

import json

import pytest
import torch
import xgrammar as xgr

from ascend_llm.server.tool_choice_schema import named_tool_schema, required_tools_schema
from tests.tiny_models import make_tokenizer

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
    "required": ["city"]}}}
NOW = {"type": "function", "function": {"name": "now"}}
ROUTE = {"type": "function", "function": {"name": "route", "parameters": {
    "type": "object", "properties": {"stops": {"type": "array", "items": {"$ref": "#/$defs/place"}}},
    "required": ["stops"], "$defs": {"place": {"type": "object", "properties": {"name": {"type": "string"}},
                                              "required": ["name"]}}}}}


@pytest.fixture(scope="module")
def compiler():
    tokenizer = make_tokenizer()
    return tokenizer, xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer)))


def _accepts(compiler, schema: dict, text: str) -> bool:
    """Whether the grammar of `schema` takes `text` token by token (each token allowed by the
    matcher's bitmask) and is complete at its end."""
    tokenizer, grammar_compiler = compiler
    matcher = xgr.GrammarMatcher(grammar_compiler.compile_json_schema(json.dumps(schema)))
    bitmask = xgr.allocate_token_bitmask(1, len(tokenizer))
    for token in tokenizer.encode(text, add_special_tokens=False):
        matcher.fill_next_token_bitmask(bitmask)
        allowed = xgr.testing.bitmask_to_bool_mask(bitmask, len(tokenizer))[0]      # [vocab]
        if not bool(allowed[token]) or not matcher.accept_token(token):
            return False
    return matcher.is_completed()


@pytest.mark.parametrize("text,ok", [
    ('[{"name": "get_weather", "parameters": {"city": "Paris"}}]', True),
    ('[{"name": "now", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "Oslo", "unit": "C"}}]',
     True),
    ('[{"name": "route", "parameters": {"stops": [{"name": "A"}, {"name": "B"}]}}]', True),
    ("[]", False),                                                            # minItems 1
    ('[{"name": "get_time", "parameters": {}}]', False),                      # not a tool
    ('[{"name": "get_weather", "parameters": {"town": "Paris"}}]', False),    # required city
    ('[{"name": "get_weather", "parameters": {"city": "Paris", "unit": "K"}}]', False),
    ('[{"name": "get_weather"}]', False),                                     # parameters required
    ('[{"name": "route", "parameters": {"stops": [{}]}}]', False),            # $ref still resolves
    ('{"name": "now", "parameters": {}}', False),                             # not an array
])
def test_required_schema(compiler, text, ok):
    assert _accepts(compiler, required_tools_schema([WEATHER, NOW, ROUTE]), text) is ok


def test_required_without_parallel_calls_allows_one(compiler):
    schema = required_tools_schema([WEATHER, NOW], parallel=False)
    assert _accepts(compiler, schema, '[{"name": "now", "parameters": {}}]')
    assert not _accepts(compiler, schema, '[{"name": "now", "parameters": {}}, {"name": "now", "parameters": {}}]')


@pytest.mark.parametrize("text,ok", [
    ('{"city": "Paris"}', True),
    ('{"city": "Paris", "unit": "F"}', True),
    ("{}", False),
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', False),
    ('[{"city": "Paris"}]', False),
])
def test_named_schema(compiler, text, ok):
    assert _accepts(compiler, named_tool_schema(WEATHER), text) is ok


def test_a_tool_without_parameters_takes_an_empty_object(compiler):
    assert _accepts(compiler, named_tool_schema(NOW), "{}")
    assert not _accepts(compiler, named_tool_schema(NOW), "[]")


def test_conflicting_defs_are_rejected():
    other = json.loads(json.dumps(ROUTE))
    other["function"]["name"] = "route2"
    other["function"]["parameters"]["$defs"]["place"] = {"type": "string"}
    with pytest.raises(ValueError, match="place"):
        required_tools_schema([ROUTE, other])
    assert "$defs" in required_tools_schema([ROUTE]) and "$defs" in ROUTE["function"]["parameters"]   # no mutation


def test_mask_blocks_a_wrong_first_token(compiler):
    tokenizer, grammar_compiler = compiler
    matcher = xgr.GrammarMatcher(grammar_compiler.compile_json_schema(json.dumps(required_tools_schema([NOW]))))
    bitmask = xgr.allocate_token_bitmask(1, len(tokenizer))
    matcher.fill_next_token_bitmask(bitmask)
    allowed = xgr.testing.bitmask_to_bool_mask(bitmask, len(tokenizer))[0]
    assert allowed[tokenizer.convert_tokens_to_ids("[")] and not allowed[tokenizer.convert_tokens_to_ids("{")]
    assert torch.count_nonzero(allowed) < len(tokenizer)
