"""POST /v1/chat/completions: messages through the chat template, streaming or not."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi.responses import JSONResponse, StreamingResponse

from ascend_llm.outputs import CompletionOutput, RequestOutput
from ascend_llm.sampling_params import SamplingParams
from ascend_llm.server.chat_messages import content_text, template_message
from ascend_llm.server.errors import APIError, bad_request
from ascend_llm.server.logprobs import chat_logprobs, prompt_logprobs_json
from ascend_llm.server.protocol import (ChatChoice, ChatCompletionChunk, ChatCompletionRequest,
                                        ChatCompletionResponse, ChatMessageIn, ChatMessageOut,
                                        ChatStreamChoice, DeltaMessage, UsageInfo, random_id)
from ascend_llm.server.serving_completion import usage
from ascend_llm.server.serving_engine import OutputStream, PromptInput, ServingContext
from ascend_llm.server.serving_tools import ToolRequest, resolve_tools
from ascend_llm.server.streaming import DONE, SSE_HEADERS, DeltaTracker, sse, sse_error
from ascend_llm.server.structured_request import structured_renames, structured_source
from ascend_llm.server.tool_parsers import ToolParser

_RENAMES = {"logprobs": "top_logprobs"}


@dataclass
class _Prepared:
    request: ChatCompletionRequest
    model: str
    prompt: PromptInput
    params: SamplingParams
    top_logprobs: int | None
    role: str = "assistant"     # the response's role: the last message's when no generation prompt is added
    echo_text: str = ""         # `echo`: the last message's content, sent before the generated text
    tools: ToolRequest | None = None


class ChatServing:
    """Validates chat requests, renders the template, runs them, formats the responses."""

    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create(self, req: ChatCompletionRequest) -> JSONResponse | StreamingResponse:
        p = self.prepare(req)
        request_id = random_id("chatcmpl")
        stream = await self.ctx.submit(request_id, [p.prompt], [p.params], renames=structured_renames(req))
        if req.stream:
            return StreamingResponse(self._stream(request_id, p, stream), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        finals = await stream.collect()
        return JSONResponse(self._response(request_id, p, finals[0]).model_dump())

    # ---------------------------------------------------------- validation
    def prepare(self, req: ChatCompletionRequest) -> _Prepared:
        model = self.ctx.check_model(req.model)
        top = _top_logprobs(req)
        add_generation_prompt = _generation_prompt(req)
        tools = resolve_tools(req, self.ctx.config)
        prompt = self.render(req.messages, add_generation_prompt, req.chat_template_kwargs,
                             tools.prompt_tools if tools else None,
                             continue_final_message=req.continue_final_message)
        role = "assistant" if add_generation_prompt else req.messages[-1].role
        echo = _echo_text(req, role)
        tokens_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = self.ctx.resolve_max_tokens(requested, len(prompt.token_ids), "messages", tokens_param)
        params = self.ctx.sampling_params(req, max_tokens, top, _RENAMES, **_tool_overrides(tools, req))
        return _Prepared(req, model, prompt, params, top, role=role, echo_text=echo, tools=tools)

    def render(self, messages: list[ChatMessageIn], add_generation_prompt: bool = True,
               template_kwargs: dict[str, Any] | None = None, tools: list[dict[str, Any]] | None = None,
               continue_final_message: bool = False) -> PromptInput:
        """Apply the chat template (with `tools` as transformers passes them); 400 naming `messages`
        when it cannot be applied.

        `continue_final_message` renders the conversation open-ended: the text stops right after the
        last message's content (as transformers' `apply_chat_template(continue_final_message=True)`)."""
        if not messages:
            raise bad_request("messages: must contain at least one message", "messages")
        conversation = [template_message(m, i) for i, m in enumerate(messages)]
        tokenizer = self.ctx.tokenizer
        extra = {**(template_kwargs or {}), **({"tools": tools} if tools else {})}
        try:
            text = tokenizer.apply_chat_template(conversation, chat_template=self.ctx.config.chat_template,
                                                 add_generation_prompt=add_generation_prompt, tokenize=False,
                                                 **extra)
        except Exception as exc:  # jinja / template errors: the request's fault or a missing template
            raise bad_request(f"messages: could not apply the chat template: {exc}", "messages") from None
        if continue_final_message:
            text = _cut_after_final_message(text, conversation[-1]["content"])
        return PromptInput(text, self.ctx.encode(text, "messages", add_special_tokens=False))

    # ------------------------------------------------------------ response
    def _response(self, request_id: str, p: _Prepared, final: RequestOutput) -> ChatCompletionResponse:
        choices = [ChatChoice(index=c.index, message=message, logprobs=self._logprobs(p, c.token_ids, c.logprobs),
                              finish_reason=finish_reason, stop_reason=c.stop_reason)
                   for c in final.outputs for message, finish_reason in [_message(p, c)]]
        return ChatCompletionResponse(id=request_id, model=p.model, choices=choices, usage=usage([final]),
                                      prompt_logprobs=prompt_logprobs_json(final.prompt_logprobs))

    def _logprobs(self, p: _Prepared, token_ids: list[int], logprobs: Any) -> Any:
        if p.top_logprobs is None or logprobs is None:
            return None
        return chat_logprobs(token_ids, logprobs, p.top_logprobs, self.ctx.tokenizer,
                             as_token_ids=self.ctx.tokens_as_ids(p.request))

    async def _stream(self, request_id: str, p: _Prepared, stream: OutputStream) -> AsyncIterator[str]:
        created = int(time.time())
        trackers = [DeltaTracker(p.params.stop_str_buffer_length) for _ in range(p.params.n)]
        parsers = [p.tools.new_parser() if p.tools else None for _ in range(p.params.n)]
        final: RequestOutput | None = None
        opts = p.request.stream_options
        continuous = bool(opts and opts.include_usage and opts.continuous_usage_stats)
        prompt_usage = UsageInfo(prompt_tokens=len(p.prompt.token_ids), total_tokens=len(p.prompt.token_ids))
        try:
            yield self._chunk(request_id, created, p, [ChatStreamChoice(
                index=j, delta=DeltaMessage(role=p.role, content="")) for j in range(p.params.n)],
                prompt_usage if continuous else None)
            if p.echo_text:
                yield self._chunk(request_id, created, p, [ChatStreamChoice(
                    index=j, delta=DeltaMessage(content=p.echo_text)) for j in range(p.params.n)],
                    prompt_usage if continuous else None)
            async for _, out in stream:
                choices = [ch for c in out.outputs
                           if (ch := self._choice(p, c, trackers[c.index], parsers[c.index])) is not None]
                if choices:
                    yield self._chunk(request_id, created, p, choices, usage([out]) if continuous else None)
                final = out if out.finished else final
            if opts and opts.include_usage and final is not None:
                yield self._chunk(request_id, created, p, [], usage([final]))
        except APIError as exc:
            yield sse_error(exc)
        finally:
            stream.abort()
        yield DONE

    def _choice(self, p: _Prepared, c: CompletionOutput, tracker: DeltaTracker,
                parser: ToolParser | None) -> ChatStreamChoice | None:
        delta = tracker.advance(c)
        if delta is None:
            return None
        logprobs = self._logprobs(p, delta.token_ids, delta.logprobs)
        text, tool_calls, finish_reason = delta.text, None, delta.finish_reason
        if parser is not None:
            parsed = parser.extract_tool_calls_streaming(delta.text, final=finish_reason is not None)
            text, tool_calls = parsed.content, parsed.tool_calls or None
            finish_reason = p.tools.finish_reason(finish_reason, parser.tools_called)
        if not text and not tool_calls and finish_reason is None and logprobs is None:
            return None
        content = text if text or (finish_reason is None and not tool_calls) else None
        return ChatStreamChoice(index=c.index, delta=DeltaMessage(content=content, tool_calls=tool_calls),
                                logprobs=logprobs, finish_reason=finish_reason, stop_reason=delta.stop_reason)

    @staticmethod
    def _chunk(request_id: str, created: int, p: _Prepared, choices: list[ChatStreamChoice],
               usage_info: Any = None) -> str:
        return sse(ChatCompletionChunk(id=request_id, created=created, model=p.model, choices=choices,
                                       usage=usage_info))


def _generation_prompt(req: ChatCompletionRequest) -> bool:
    """Whether the template adds the assistant prompt. `continue_final_message` turns it off unless the
    request set both to true, which is a 400 as in vLLM's ChatCompletionRequest validator."""
    if not req.continue_final_message:
        return req.add_generation_prompt
    if req.add_generation_prompt and "add_generation_prompt" in req.model_fields_set:
        raise bad_request("Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
                          "continue_final_message")
    return False


def _echo_text(req: ChatCompletionRequest, role: str) -> str:
    """`echo`: the last message's content when it has the response's role (vLLM's rule), else nothing."""
    last = req.messages[-1]
    return content_text(last, len(req.messages) - 1) if req.echo and last.role == role else ""


def _cut_after_final_message(text: str, final: str) -> str:
    """`text` up to the end of the last message's content (whitespace-stripped, as templates often strip)."""
    final = final.strip()
    end = text.rfind(final) if final else -1
    if end < 0:
        raise bad_request("continue_final_message: the last message has no content that appears in the "
                          "rendered chat template, so there is nothing to continue", "continue_final_message")
    return text[:end + len(final)]


def _tool_overrides(tools: ToolRequest | None, req: ChatCompletionRequest) -> dict[str, Any]:
    """SamplingParams settings a tool request needs: the grammar of "required" / a named function,
    and special tokens kept when the parser's markers are special tokens."""
    if tools is None:
        return {}
    overrides: dict[str, Any] = {}
    structured = tools.structured_outputs()
    if structured is not None:
        source = structured_source(req)
        if source is not None:        # vLLM lets the tool schema win silently; we say so instead
            raise bad_request(f"{source}: cannot be combined with tool_choice 'required' or a named "
                              f"function (their schema already constrains the output)", source)
        overrides["structured_outputs"] = structured
    if tools.keep_special_tokens:
        overrides["skip_special_tokens"] = False
    return overrides


def _message(p: _Prepared, c: CompletionOutput) -> tuple[ChatMessageOut, str | None]:
    """The assistant message of a finished choice (tool calls parsed out) and its finish reason."""
    parser = p.tools.new_parser() if p.tools else None
    if parser is None:
        return ChatMessageOut(role=p.role, content=p.echo_text + c.text), c.finish_reason
    extracted = parser.extract_tool_calls(c.text)
    content = p.echo_text + (extracted.content or "") if p.echo_text else extracted.content
    message = ChatMessageOut(role=p.role, content=content, tool_calls=extracted.tool_calls or None)
    return message, p.tools.finish_reason(c.finish_reason, extracted.tools_called)


def _top_logprobs(req: ChatCompletionRequest) -> int | None:
    """Engine `logprobs` for a chat request: top_logprobs when logprobs is true, else None."""
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("when using `top_logprobs`, `logprobs` must be set to true.", "top_logprobs")
    if req.top_logprobs is not None and req.top_logprobs < 0:
        raise bad_request(f"top_logprobs: must be >= 0, got {req.top_logprobs}", "top_logprobs")
    if not req.logprobs:
        return None
    return req.top_logprobs or 0
