"""Pydantic request / response models of the OpenAI-compatible API (plus vLLM / FastDeploy extras)."""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class OpenAIModel(BaseModel):
    """Base of responses and nested message objects: unknown fields are ignored; NaN / +-inf floats are rejected."""
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class RequestModel(OpenAIModel):
    """Base of request bodies: a field this server does not implement is a 400 naming it, never ignored."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# ------------------------------------------------------------------ requests
class StreamOptions(RequestModel):
    include_usage: bool = True
    continuous_usage_stats: bool = False


class SamplingRequest(RequestModel):
    """Fields shared by completions and chat completions.

    Besides the fields that change the output, a few OpenAI fields are accepted as no-ops because
    they have no effect on what a single-model server without stored completions returns."""
    model: str | None = None
    n: int = 1
    best_of: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None
    prompt_logprobs: int | None = None
    use_beam_search: bool = False               # vLLM; true is a 400 (no beam search here)
    return_tokens_as_token_ids: bool | None = None   # vLLM: logprob tokens as "token_id:N"
    # no-ops: end-user / abuse-tracking ids, cache-routing hints, and stored-completion tags
    user: str | None = None                     # OpenAI: end-user id for abuse monitoring; nothing to do
    safety_identifier: str | None = None        # OpenAI: successor of `user`; nothing to do
    prompt_cache_key: str | None = None         # OpenAI: cache routing hint; prefix caching here is automatic
    service_tier: str | None = None             # OpenAI: pricing / latency tier; one tier here
    metadata: dict[str, str] | None = None      # OpenAI: tags for stored completions; kept nowhere
    store: bool | None = None                   # OpenAI: store the completion; true is a 400 (nothing is stored)
    # structured outputs: OpenAI's response_format, vLLM's structured_outputs and legacy guided_*
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None


class CompletionRequest(SamplingRequest):
    """POST /v1/completions. `prompt` is a string, a list of strings, token ids, or lists of token ids."""
    prompt: Any = None
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None


class ContentPart(RequestModel):
    """A content part of a chat message. This model takes text only: `text` parts, and the `refusal`
    parts of assistant messages (read as text, as vLLM's chat_utils.py does); a part of any other type
    (`image_url`, `input_audio`, `file`, ...) is a 400 naming `messages[i].content[j].type`."""
    type: str
    text: str | None = None
    refusal: str | None = None
    prompt_cache_breakpoint: dict[str, Any] | None = None   # OpenAI cache hint: prefix caching here is automatic

    @field_validator("type")
    @classmethod
    def _text_only(cls, value: str) -> str:
        if value not in ("text", "refusal"):
            raise ValueError(f"content parts of type {value!r} are not supported: this model takes text only "
                             "(parts of type 'text')")
        return value

    @model_validator(mode="after")
    def _has_its_text(self) -> "ContentPart":
        given = {"text": self.text, "refusal": self.refusal}
        if not isinstance(given.pop(self.type), str):
            raise ValueError(f"a {self.type!r} part needs a string `{self.type}`")
        stray = [key for key, value in given.items() if value is not None]
        if stray:
            raise ValueError(f"a {self.type!r} part does not take `{stray[0]}`")
        return self

    @property
    def value(self) -> str:
        """The part's text (a refusal part's refusal)."""
        return self.text if self.type == "text" else self.refusal


class ChatMessageIn(RequestModel):
    """One chat message: the fields of OpenAI's ChatCompletion*MessageParam types (and what the openai SDK
    serialises when a response's message is sent back) plus vLLM's `reasoning` / `reasoning_content`.
    Fields that cannot be honoured here (`audio`, `function_call`, non-empty `annotations`) are accepted
    only when null / empty; chat_messages.py checks them, with the message's index."""
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None
    name: str | None = None                           # passed to the chat template, as vLLM does
    tool_calls: list[dict[str, Any]] | None = None    # assistant turns that called tools
    tool_call_id: str | None = None                   # tool turns: the call this result answers
    refusal: str | None = None                        # assistant: a refusal, rendered as the message's text
    reasoning: str | None = None                      # vLLM: assistant's thinking, passed to the template
    reasoning_content: str | None = None              # vLLM's deprecated spelling of `reasoning`
    annotations: list[Any] | None = None              # SDK round trip: url citations; only null or []
    audio: Any = None                                 # SDK round trip: an audio reply; only null
    function_call: Any = None                         # deprecated by OpenAI; only null (use tool_calls)


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""
    messages: list[ChatMessageIn]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: Any = None                              # deprecated by OpenAI: rejected, use tools
    function_call: Any = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False        # vLLM: continue the last (assistant) message
    echo: bool = False                          # vLLM: prefix the output with the last message's content


class EmbeddingRequest(RequestModel):
    """POST /v1/embeddings: `input` is a string, a list of strings, token ids, or lists of token ids."""
    model: str | None = None
    input: Any = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None               # only the model's own size (no Matryoshka truncation)
    user: str | None = None                     # OpenAI: end-user id for abuse monitoring; nothing to do


class TokenizeRequest(RequestModel):
    """POST /tokenize: either `prompt` or chat `messages`."""
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessageIn] | None = None
    tools: list[dict[str, Any]] | None = None          # rendered with `messages`, as in chat
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: list[int]


# ----------------------------------------------------------------- responses
class UsageInfo(OpenAIModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogProbs(OpenAIModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    end_offset: int = Field(default=0, exclude=True)   # text offset after the last token (where a stream continues)


class CompletionChoice(OpenAIModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: list[dict[str, dict[str, Any]] | None] | None = None


class CompletionResponse(OpenAIModel):
    id: str
    object: str = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(OpenAIModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogProbs(OpenAIModel):
    content: list[ChatTokenLogprob] | None = None


class FunctionCall(OpenAIModel):
    name: str
    arguments: str                  # a JSON object as text, as OpenAI sends it


class ToolCall(OpenAIModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaFunctionCall(OpenAIModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(OpenAIModel):
    """One streamed piece of a tool call: the first has id, type and name, the rest argument text."""
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class ChatMessageOut(OpenAIModel):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(OpenAIModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(OpenAIModel):
    id: str
    object: str = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: list[dict[str, dict[str, Any]] | None] | None = None


class DeltaMessage(OpenAIModel):
    role: str | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(OpenAIModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(OpenAIModel):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(OpenAIModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "ascend-llm"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(OpenAIModel):
    object: str = "list"
    data: list[ModelCard]


class TokenizeResponse(OpenAIModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(OpenAIModel):
    prompt: str


class EmbeddingData(OpenAIModel):
    object: str = "embedding"
    index: int
    embedding: list[float] | str                # base64: little-endian float32 bytes


class EmbeddingResponse(OpenAIModel):
    id: str
    object: str = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[EmbeddingData]
    usage: UsageInfo
