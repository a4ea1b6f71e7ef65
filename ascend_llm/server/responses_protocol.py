"""Pydantic models of OpenAI's Responses API (POST /v1/responses): the request, and the response
object with its output items, as the openai SDK's `openai.types.responses` defines them and vLLM's
`entrypoints/openai/protocol.py` (`ResponsesRequest`, `ResponsesResponse`) serves them.

Input items, tools, `tool_choice` and `text` stay plain JSON here: responses_request.py checks
them one by one so a 400 names the exact field (`input[2].call_id`, `tools[0].name`, ...)."""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import Field

from ascend_llm.server.protocol import OpenAIModel, RequestModel


def response_item_id(prefix: str) -> str:
    """An OpenAI-style object id: `resp_`, `msg_`, `fc_` + 32 hex digits (no dash, as OpenAI's)."""
    return f"{prefix}_{uuid.uuid4().hex}"


# ------------------------------------------------------------------ request
class ResponsesRequest(RequestModel):
    """POST /v1/responses. Fields OpenAI defines that this server cannot honour are declared so
    that responses_request.py can name them in a 400 (`reasoning`, `background`, `include`, ...);
    fields it does not know at all are a 400 from the model itself (extra="forbid")."""
    model: str | None = None
    input: str | list[Any] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    stream: bool = False
    store: bool | None = None                   # accepted, never stored (vLLM's default); echoed as false
    include: list[Any] | None = None            # only "message.output_text.logprobs"; other values a 400
    top_logprobs: int | None = None             # with that include value
    truncation: Literal["auto", "disabled"] | None = None    # "auto" is a 400 (no prompt truncation)
    # no-ops, as on chat: ids for abuse monitoring, a cache-routing hint, the pricing tier
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None
    # OpenAI fields not implemented here: set to anything but their default, a 400 naming them
    previous_response_id: str | None = None     # needs stored responses
    conversation: Any = None
    background: bool | None = None
    reasoning: Any = None
    max_tool_calls: int | None = None
    prompt: Any = None
    stream_options: dict[str, Any] | None = None
    # vLLM's extra sampling parameters on its ResponsesRequest
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    logit_bias: dict[str, float] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: dict[str, Any] | None = None


# ---------------------------------------------------------------- response
class OutputText(OpenAIModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(OpenAIModel):
    """An assistant message item of `output`."""
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"] = "completed"
    content: list[OutputText] = Field(default_factory=list)


class FunctionCallItem(OpenAIModel):
    """A `function_call` item of `output`: the client runs it and answers with a
    `function_call_output` input item carrying the same `call_id`."""
    id: str
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str                      # a JSON object as text
    status: Literal["in_progress", "completed", "incomplete"] = "completed"


class InputTokensDetails(OpenAIModel):
    cached_tokens: int = 0              # prompt tokens whose KV came from the prefix cache
    cache_write_tokens: int = 0         # OpenAI's explicit prompt-cache writes: none here


class OutputTokensDetails(OpenAIModel):
    reasoning_tokens: int = 0


class ResponseUsage(OpenAIModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(OpenAIModel):
    reason: Literal["max_output_tokens"] = "max_output_tokens"


class ResponseObject(OpenAIModel):
    """The `response` object: status, output items, usage, and the request's parameters echoed
    back (as OpenAI returns them; vLLM's ResponsesResponse.from_request)."""
    id: str
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    status: Literal["in_progress", "completed", "incomplete", "failed"] = "completed"
    error: dict[str, Any] | None = None
    incomplete_details: IncompleteDetails | None = None
    model: str
    output: list[OutputMessage | FunctionCallItem] = Field(default_factory=list)
    usage: ResponseUsage | None = None
    # the echo of the request
    instructions: str | None = None
    max_output_tokens: int | None = None
    max_tool_calls: int | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    reasoning: dict[str, Any] | None = None
    service_tier: str = "default"
    store: bool = False
    background: bool = False
    temperature: float | None = None
    top_p: float | None = None
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    tool_choice: Any = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    top_logprobs: int = 0
    truncation: str = "disabled"
    user: str | None = None
