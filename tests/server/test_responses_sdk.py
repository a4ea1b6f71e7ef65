"""The openai SDK's Responses client against a real server process (bundled SmolLM2, one module-scoped
server): `responses.create` text, streamed text, a two-turn function-tool round trip (`tool_choice`
"required", grammar-enforced so it always yields a call, streamed through `responses.stream`, then
answered with a `function_call_output` item next to the SDK's own output items), and
`responses.parse` with a Pydantic `text_format` (a strict json_schema) whose output validates."""
from __future__ import annotations

import json

import openai
import pytest
from pydantic import BaseModel, Field

from tests.server.tool_fixtures import smollm2_server

pytestmark = pytest.mark.slow

WEATHER = {"type": "function", "name": "get_weather", "description": "Get the current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 16}},
                          "required": ["city"], "additionalProperties": False}, "strict": True}
INSTRUCTIONS = "Use the tools."


class City(BaseModel):
    name: str = Field(max_length=16)


@pytest.fixture(scope="module")
def sdk(tmp_path_factory) -> openai.OpenAI:
    for base_url in smollm2_server(tmp_path_factory):     # no auto flags: "required" needs none
        yield openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def model(sdk) -> str:
    return sdk.models.list().data[0].id


def test_create_text(sdk, model):
    response = sdk.responses.create(model=model, input="Name a colour.", instructions="Answer in one word.",
                                    max_output_tokens=8, temperature=0, store=False)
    assert response.status in ("completed", "incomplete") and response.output_text.strip()
    assert response.output[0].type == "message" and response.usage.output_tokens <= 8


def test_streamed_text(sdk, model):
    events = list(sdk.responses.create(model=model, input=[{"role": "user", "content": "Say hello."}],
                                       max_output_tokens=8, temperature=0, stream=True))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert events[0].type == "response.created" and events[-1].type in ("response.completed", "response.incomplete")
    assert deltas and events[-1].response.output_text == deltas
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_two_turn_function_call_round_trip(sdk, model):
    question = {"role": "user", "content": "What is the weather in Paris?"}
    with sdk.responses.stream(model=model, input=[question], instructions=INSTRUCTIONS, tools=[WEATHER],
                              tool_choice="required", parallel_tool_calls=False, max_output_tokens=40,
                              temperature=0) as stream:
        streamed = "".join(e.delta for e in stream if e.type == "response.function_call_arguments.delta")
        first = stream.get_final_response()
    [call] = first.output                  # "required" without parallel calls: exactly one call, no text
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    assert streamed == call.arguments and set(json.loads(call.arguments)) == {"city"}
    result = {"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature": 18, "unit": "C"}'}
    second = sdk.responses.create(model=model, input=[question, *first.output, result], instructions=INSTRUCTIONS,
                                  tools=[WEATHER], tool_choice="none", max_output_tokens=8, temperature=0)
    assert second.output[0].type == "message" and second.output_text.strip()
    assert not [item for item in second.output if item.type == "function_call"]


def test_parse_with_a_json_schema(sdk, model):
    response = sdk.responses.parse(model=model, input="Name a city in France, as JSON.", text_format=City,
                                   max_output_tokens=40, temperature=0)
    assert response.status == "completed" and isinstance(response.output_parsed, City)
    assert City.model_validate_json(response.output_text) == response.output_parsed
    assert response.text.format.type == "json_schema" and response.text.format.name == "City"
