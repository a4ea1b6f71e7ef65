"""POST /v1/chat/completions: messages through the chat template, streaming or not."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi.responses import JSONResponse, StreamingResponse

from ascend_llm.outputs import CompletionOutput, RequestOutput
from ascend_llm.sampling_params import SamplingParams
from ascend_llm.server.errors import APIError, bad_request
from ascend_llm.server.logprobs import chat_logprobs, prompt_logprobs_json
from ascend_llm.server.protocol import (ChatChoice, ChatCompletionChunk, ChatCompletionRequest,
                                        ChatCompletionResponse, ChatMessageIn, ChatMessageOut,
                                        ChatStreamChoice, DeltaMessage, random_id)
from ascend_llm.server.serving_completion import usage
from ascend_llm.server.serving_engine import OutputStream, PromptInput, ServingContext
from ascend_llm.server.streaming import DONE, SSE_HEADERS, DeltaTracker, sse, sse_error
from ascend_llm.server.structured_request import structured_renames

_RENAMES = {"logprobs": "top_logprobs"}


@dataclass
class _Prepared:
    request: ChatCompletionRequest
    model: str
    prompt: PromptInput
    params: SamplingParams
    top_logprobs: int | None


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
        _check_unsupported(req)
        top = _top_logprobs(req)
        prompt = self.render(req.messages, req.add_generation_prompt, req.chat_template_kwargs)
        tokens_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = self.ctx.resolve_max_tokens(requested, len(prompt.token_ids), "messages", tokens_param)
        params = self.ctx.sampling_params(req, max_tokens, top, _RENAMES)
        return _Prepared(req, model, prompt, params, top)

    def render(self, messages: list[ChatMessageIn], add_generation_prompt: bool = True,
               template_kwargs: dict[str, Any] | None = None) -> PromptInput:
        """Apply the chat template; 400 naming `messages` when it cannot be applied."""
        if not messages:
            raise bad_request("messages: must contain at least one message", "messages")
        conversation = [{"role": m.role, "content": _content_text(m, i)} for i, m in enumerate(messages)]
        tokenizer = self.ctx.tokenizer
        try:
            text = tokenizer.apply_chat_template(conversation, chat_template=self.ctx.config.chat_template,
                                                 add_generation_prompt=add_generation_prompt, tokenize=False,
                                                 **(template_kwargs or {}))
        except Exception as exc:  # jinja / template errors: the request's fault or a missing template
            raise bad_request(f"messages: could not apply the chat template: {exc}", "messages") from None
        return PromptInput(text, self.ctx.encode(text, "messages", add_special_tokens=False))

    # ------------------------------------------------------------ response
    def _response(self, request_id: str, p: _Prepared, final: RequestOutput) -> ChatCompletionResponse:
        choices = [ChatChoice(index=c.index, message=ChatMessageOut(content=c.text),
                              logprobs=self._logprobs(p, c.token_ids, c.logprobs),
                              finish_reason=c.finish_reason, stop_reason=c.stop_reason)
                   for c in final.outputs]
        return ChatCompletionResponse(id=request_id, model=p.model, choices=choices, usage=usage([final]),
                                      prompt_logprobs=prompt_logprobs_json(final.prompt_logprobs))

    def _logprobs(self, p: _Prepared, token_ids: list[int], logprobs: Any) -> Any:
        if p.top_logprobs is None or logprobs is None:
            return None
        return chat_logprobs(token_ids, logprobs, p.top_logprobs, self.ctx.tokenizer)

    async def _stream(self, request_id: str, p: _Prepared, stream: OutputStream) -> AsyncIterator[str]:
        created = int(time.time())
        trackers = [DeltaTracker(p.params.stop_str_buffer_length) for _ in range(p.params.n)]
        final: RequestOutput | None = None
        opts = p.request.stream_options
        try:
            yield self._chunk(request_id, created, p, [ChatStreamChoice(
                index=j, delta=DeltaMessage(role="assistant", content="")) for j in range(p.params.n)])
            async for _, out in stream:
                choices = [ch for c in out.outputs if (ch := self._choice(p, c, trackers[c.index])) is not None]
                if choices:
                    extra = usage([out]) if opts and opts.continuous_usage_stats else None
                    yield self._chunk(request_id, created, p, choices, extra)
                final = out if out.finished else final
            if opts and opts.include_usage and final is not None:
                yield self._chunk(request_id, created, p, [], usage([final]))
        except APIError as exc:
            yield sse_error(exc)
        finally:
            stream.abort()
        yield DONE

    def _choice(self, p: _Prepared, c: CompletionOutput, tracker: DeltaTracker) -> ChatStreamChoice | None:
        delta = tracker.advance(c)
        if delta is None:
            return None
        logprobs = self._logprobs(p, delta.token_ids, delta.logprobs)
        if not delta.text and delta.finish_reason is None and logprobs is None:
            return None
        content = delta.text if delta.text or delta.finish_reason is None else None
        return ChatStreamChoice(index=c.index, delta=DeltaMessage(content=content), logprobs=logprobs,
                                finish_reason=delta.finish_reason, stop_reason=delta.stop_reason)

    @staticmethod
    def _chunk(request_id: str, created: int, p: _Prepared, choices: list[ChatStreamChoice],
               usage_info: Any = None) -> str:
        return sse(ChatCompletionChunk(id=request_id, created=created, model=p.model, choices=choices,
                                       usage=usage_info))


def _check_unsupported(req: ChatCompletionRequest) -> None:
    if req.tools:
        raise bad_request("tools: tool calling is not supported yet", "tools")


def _top_logprobs(req: ChatCompletionRequest) -> int | None:
    """Engine `logprobs` for a chat request: top_logprobs when logprobs is true, else None."""
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("when using `top_logprobs`, `logprobs` must be set to true.", "top_logprobs")
    if req.top_logprobs is not None and req.top_logprobs < 0:
        raise bad_request(f"top_logprobs: must be >= 0, got {req.top_logprobs}", "top_logprobs")
    if not req.logprobs:
        return None
    return req.top_logprobs or 0


def _content_text(message: ChatMessageIn, index: int) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise bad_request(f"messages.{index}.content: part type {part.type!r} is not supported "
                              "(only 'text')", "messages")
        texts.append(part.text)
    return "".join(texts)
