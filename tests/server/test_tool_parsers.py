"""Every `--tool-call-parser` on fixed model outputs: single and parallel calls, content before the
calls, malformed call text left as content, and streamed deltas that add up to the same calls.
Formats from vLLM's tool_parsers/{hermes,llama,mistral,pythonic,qwen3coder,ernie45}_tool_parser.py."""
from __future__ import annotations

import json

import pytest

from ascend_llm.server.tool_parsers import (TOOL_PARSERS, NamedToolCallParser, RequiredToolCallsParser,
                                            ToolParser, get_tool_parser)

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                     "metric": {"type": "boolean"}, "hours": {"type": "array"}}}}}
TOOLS = [WEATHER, {"type": "function", "function": {"name": "now"}}]
PARIS = {"city": "Paris", "days": 2}
EMPTY: dict = {}

# (parser, model output, expected content, expected calls [(name, arguments dict)])
CASES = [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>',
     None, [("get_weather", PARIS)]),
    ("hermes", 'Let me look.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}'
               '</tool_call>\n<tool_call>{"arguments": {}, "name": "now"}</tool_call>',
     "Let me look.", [("get_weather", PARIS), ("now", EMPTY)]),
    ("hermes", '<tool_call>{"name": "now"}', None, [("now", EMPTY)]),       # unclosed tag at the end: vLLM too
    ("hermes", '<tool_call>{"name": "get_weather", "arguments": {"city": "a \\"b\\" }]\\\\", "days": [{"x": []}]}}'
               '</tool_call>', None, [("get_weather", {"city": 'a "b" }]\\', "days": [{"x": []}]})]),
    ("hermes", 'Plain answer with {"braces": 1}.', 'Plain answer with {"braces": 1}.', []),
    ("hermes", '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>',
     '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>', []),
    ("hermes", '<tool_call>{"nom": "x"}</tool_call>', '<tool_call>{"nom": "x"}</tool_call>', []),
    ("hermes", '<tool_call>{"name": "now", "arguments": {"x": NaN}}</tool_call>',        # Python-only JSON
     '<tool_call>{"name": "now", "arguments": {"x": NaN}}</tool_call>', []),
    ("ernie45", '\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>\n',
     None, [("get_weather", PARIS)]),
    ("ernie45", "<response>Bonjour</response>", "Bonjour", []),
    ("ernie45", 'Checking.\n\n<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>\n<tool_call>\n'
                '{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>\n',
     "Checking.", [("now", EMPTY), ("get_weather", PARIS)]),
    ("ernie45", '<tool_call>\n{"name": "now", "arguments": [1]}\n</tool_call>',
     '<tool_call>\n{"name": "now", "arguments": [1]}\n</tool_call>', []),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}]',
     None, [("get_weather", PARIS)]),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}',
     None, [("get_weather", PARIS)]),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}; '
                    '{"name": "now", "parameters": {}}', None, [("get_weather", PARIS), ("now", EMPTY)]),
    ("llama3_json", '{"answer": 42}', '{"answer": 42}', []),
    ("llama3_json", "The weather is fine.", "The weather is fine.", []),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}, '
                '{"name": "now", "arguments": {}}]', None, [("get_weather", PARIS), ("now", EMPTY)]),
    ("mistral", 'Sure. [TOOL_CALLS]get_weather{"city": "Paris", "days": 2}[TOOL_CALLS]now{}',
     "Sure.", [("get_weather", PARIS), ("now", EMPTY)]),
    ("mistral", "[TOOL_CALLS][{\"name\": 1}]", "[TOOL_CALLS][{\"name\": 1}]", []),
    ("pythonic", '[get_weather(city="Paris", days=2), now()]', None, [("get_weather", PARIS), ("now", EMPTY)]),
    ("pythonic", "[get_weather(city='Paris', days=2)]", None, [("get_weather", PARIS)]),
    ("pythonic", "[get_weather('Paris')]", "[get_weather('Paris')]", []),     # positional: not a call
    ("pythonic", "I think [1, 2] is a list.", "I think [1, 2] is a list.", []),
    ("pythonic", "[get_weather(days=1e999)]", "[get_weather(days=1e999)]", []),        # inf is not JSON
    ("qwen3_coder", "I will check.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
                    "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>",
     "I will check.", [("get_weather", PARIS)]),
    ("qwen3_coder", "<tool_call>\n<function=get_weather>\n<parameter=city>\nLa Paz\n</parameter>\n<parameter=metric>"
                    "\ntrue\n</parameter>\n<parameter=hours>\n[1, 2]\n</parameter>\n</function>\n</tool_call>\n"
                    "<tool_call>\n<function=now>\n</function>\n</tool_call>",
     None, [("get_weather", {"city": "La Paz", "metric": True, "hours": [1, 2]}), ("now", EMPTY)]),
    ("qwen3_coder", "<tool_call><function=get_weather><parameter=days>inf</parameter><parameter=x>1e999</parameter>"
                    "</function></tool_call>", None, [("get_weather", {"days": "inf", "x": "1e999"})]),
    ("qwen3_coder", "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis",
     "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis", []),
]


# Malformed call text that looked like a call while it streamed: its header (and some arguments)
# were already sent when the text went wrong; a stream cannot take them back (nor can vLLM's).
STARTED_THEN_MALFORMED = {
    '<tool_call>\n{"name": "now", "arguments": [1]}\n</tool_call>',
    '<tool_call>{"name": "now", "arguments": {"x": NaN}}</tool_call>',
    "[get_weather(days=1e999)]",
    '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>',
    "[get_weather('Paris')]",
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis",
    '[{"name": "now", "parameters": {}}',
}


def _calls(extracted) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in extracted.tool_calls]


def _stream(parser: ToolParser, text: str, step: int) -> tuple[str, list[dict]]:
    """Feed `text` in pieces of `step` characters; the content and the calls the deltas add up to
    (accumulated the way the openai SDK does: by index, id/name from the first delta)."""
    content, calls = "", []
    pieces = [text[i:i + step] for i in range(0, len(text), step)] or [""]
    for i, piece in enumerate(pieces):
        delta = parser.extract_tool_calls_streaming(piece, final=i == len(pieces) - 1)
        content += delta.content
        for d in delta.tool_calls:
            if d.index == len(calls):
                assert d.id and d.type == "function" and d.function.name, d
                calls.append({"id": d.id, "name": d.function.name, "arguments": d.function.arguments or ""})
            else:
                assert d.id is None and d.function.name is None, d
                calls[d.index]["arguments"] += d.function.arguments
    return content, calls


@pytest.mark.parametrize("name,text,content,calls", CASES)
def test_extract_tool_calls(name, text, content, calls):
    extracted = get_tool_parser(name)(tools=TOOLS).extract_tool_calls(text)
    assert extracted.content == content
    assert _calls(extracted) == calls
    for call in extracted.tool_calls:
        assert call.id.startswith("call_") or name == "mistral"
        assert call.type == "function"


@pytest.mark.parametrize("step", [1, 3, 1000])
@pytest.mark.parametrize("name,text,content,calls", CASES)
def test_streaming_adds_up_to_the_same_calls(name, text, content, calls, step):
    whole = get_tool_parser(name)(tools=TOOLS).extract_tool_calls(text)
    streamed_content, streamed = _stream(get_tool_parser(name)(tools=TOOLS), text, step)
    if text in STARTED_THEN_MALFORMED:
        _assert_nothing_invented(text, streamed_content, streamed)
        return
    assert [c["arguments"] for c in streamed] == [c.function.arguments for c in whole.tool_calls]
    assert [c["name"] for c in streamed] == [c.function.name for c in whole.tool_calls]
    assert streamed_content == (whole.content or "")
    assert len({c["id"] for c in streamed}) == len(streamed)


def _assert_nothing_invented(text: str, content: str, calls: list[dict]) -> None:
    assert text.startswith(content)
    assert len(calls) <= 1 and all(c["name"] in text for c in calls)


def test_arguments_stream_in_pieces_before_the_call_ends():
    text = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}</tool_call>'
    parser = get_tool_parser("hermes")()
    deltas = [parser.extract_tool_calls_streaming(ch) for ch in text]
    pieces = [d.tool_calls[0].function.arguments for d in deltas if d.tool_calls]
    assert len(pieces) > 5 and "".join(pieces) == '{"city": "Paris", "days": 2}'
    assert all(not d.content for d in deltas)


def test_content_before_a_call_streams_without_the_marker():
    parser = get_tool_parser("hermes")()
    sent = "".join(parser.extract_tool_calls_streaming(ch).content for ch in "Hi there <tool_c")
    assert sent == "Hi there"          # "<tool_c" could open a call: held back


def test_parallel_tool_calls_false_keeps_the_first_call():
    text = '<tool_call>{"name": "now", "arguments": {}}</tool_call><tool_call>{"name": "now", "arguments": {}}'
    assert len(get_tool_parser("hermes")(parallel=False).extract_tool_calls(text).tool_calls) == 1
    _, streamed = _stream(get_tool_parser("hermes")(parallel=False), text, 4)
    assert len(streamed) == 1


def test_mistral_ids_are_nine_alphanumerics():
    # Mistral's chat templates reject other ids (vLLM's MistralToolCall.generate_random_id)
    call = get_tool_parser("mistral")().extract_tool_calls('[TOOL_CALLS]now{}').tool_calls[0]
    assert len(call.id) == 9 and call.id.isalnum()


@pytest.mark.parametrize("text,calls", [
    ('[{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}]', [("get_weather", PARIS)]),
    (' [{"name": "now", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}]',
     [("now", EMPTY), ("get_weather", PARIS)]),
    ('[{"name": "now", "parameters": {}}', []),
    ("not json", []),
])
def test_required_output_is_read_as_json(text, calls):
    extracted = RequiredToolCallsParser(tools=TOOLS).extract_tool_calls(text)
    assert _calls(extracted) == calls
    assert extracted.content == (None if calls else text)
    content, streamed = _stream(RequiredToolCallsParser(tools=TOOLS), text, 2)
    if text in STARTED_THEN_MALFORMED:
        _assert_nothing_invented(text, content, streamed)
    else:
        assert [c["arguments"] for c in streamed] == [c.function.arguments for c in extracted.tool_calls]


def test_named_output_is_the_arguments_object():
    text = ' {"city": "Paris", "days": 2}\n'
    extracted = NamedToolCallParser("get_weather").extract_tool_calls(text)
    assert extracted.content is None and _calls(extracted) == [("get_weather", PARIS)]
    _, streamed = _stream(NamedToolCallParser("get_weather"), text, 5)
    assert streamed[0]["name"] == "get_weather" and streamed[0]["arguments"] == '{"city": "Paris", "days": 2}'
    assert NamedToolCallParser("get_weather").extract_tool_calls("[1]").content == "[1]"
    assert NamedToolCallParser("get_weather").extract_tool_calls('{"x": NaN}').content == '{"x": NaN}'


def test_registry_uses_vllm_names():
    for name in ("hermes", "llama3_json", "mistral", "pythonic", "qwen3_coder", "ernie45"):
        assert name in TOOL_PARSERS
    with pytest.raises(ValueError, match="hermes"):
        get_tool_parser("nope")
