"""POST /v1/responses: OpenAI's Responses API over the chat path.

The request is read as a chat request (responses_request.py) and prepared by ChatServing (template,
tools, grammar, sampling parameters); the output is split by the same tool parser into `message`
and `function_call` items. Nothing is stored: `store` is accepted and echoed as false (vLLM's
default, VLLM_ENABLE_RESPONSES_API_STORE unset: its serving_responses.py turns `store=True`, the
OpenAI default, off rather than failing), so `previous_response_id` is a 400."""
from __future__ import annotations

import time
from typing import Any, AsyncIterator

from fastapi.responses import JSONResponse, StreamingResponse

from ascend_llm.outputs import CompletionOutput, RequestOutput
from ascend_llm.server.errors import APIError
from ascend_llm.server.logprobs import chat_logprobs
from ascend_llm.server.responses_protocol import (FunctionCallItem, IncompleteDetails, InputTokensDetails,
                                                  OutputMessage, OutputText, ResponseObject, ResponsesRequest,
                                                  ResponseUsage, response_item_id)
from ascend_llm.server.responses_request import responses_error, to_chat_request
from ascend_llm.server.responses_stream import ResponseEventWriter
from ascend_llm.server.serving_chat import ChatServing, _Prepared
from ascend_llm.server.serving_engine import OutputStream, ServingContext
from ascend_llm.server.streaming import SSE_HEADERS, DeltaTracker
from ascend_llm.server.structured_request import structured_renames


class ResponsesServing:
    """Validates Responses requests, runs them through the chat path, formats the response."""

    def __init__(self, ctx: ServingContext, chat: ChatServing) -> None:
        self.ctx = ctx
        self.chat = chat

    async def create(self, req: ResponsesRequest) -> JSONResponse | StreamingResponse:
        created_at = int(time.time())
        chat_request = to_chat_request(req)
        try:                                # the chat path's errors name chat fields: renamed
            p = self.chat.prepare(chat_request)
            response_id = response_item_id("resp")
            stream = await self.ctx.submit(response_id, [p.prompt], [p.params],
                                           renames=structured_renames(p.request))
        except APIError as exc:
            raise responses_error(exc) from None
        if req.stream:
            return StreamingResponse(self._stream(response_id, req, p, stream, created_at),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        final = (await stream.collect())[0]
        output = self._output(p, final.outputs[0])
        return JSONResponse(self._response(response_id, req, p, output, final, created_at).model_dump())

    # ------------------------------------------------------------ response
    def _response(self, response_id: str, req: ResponsesRequest, p: _Prepared,
                  output: list[OutputMessage | FunctionCallItem], final: RequestOutput | None,
                  created_at: int) -> ResponseObject:
        """The response object; `final` None while in progress (no status, no usage yet)."""
        response = ResponseObject(id=response_id, created_at=created_at, model=p.model, output=output,
                                  status="in_progress", **_echo(req, p))
        if final is None:
            return response
        completion = final.outputs[0]
        response.usage = _usage(final, completion)
        if completion.finish_reason == "length":
            response.status, response.incomplete_details = "incomplete", IncompleteDetails()
        else:
            response.status = "completed"
        return response

    def _logprobs(self, p: _Prepared, token_ids: list[int], logprobs: Any) -> list[dict[str, Any]]:
        """The tokens' logprobs in the `output_text.logprobs` shape (empty unless included)."""
        if p.top_logprobs is None or logprobs is None:
            return []
        content = chat_logprobs(token_ids, logprobs, p.top_logprobs, self.ctx.tokenizer,
                                as_token_ids=self.ctx.tokens_as_ids(p.request)).content
        return [entry.model_dump() for entry in content]

    def _output(self, p: _Prepared, completion: CompletionOutput) -> list[OutputMessage | FunctionCallItem]:
        """A finished output as items: its text as one message (when there is text, or nothing
        else), then one `function_call` item per parsed call."""
        parser = p.tools.new_parser() if p.tools else None
        text, calls = completion.text, []
        if parser is not None:
            extracted = parser.extract_tool_calls(text)
            text, calls = extracted.content or "", extracted.tool_calls
        items: list[OutputMessage | FunctionCallItem] = []
        if text.strip() or not calls:
            status = "incomplete" if completion.finish_reason == "length" else "completed"
            logprobs = self._logprobs(p, completion.token_ids, completion.logprobs)
            items.append(OutputMessage(id=response_item_id("msg"), status=status,
                                       content=[OutputText(text=text, logprobs=logprobs)]))
        items.extend(FunctionCallItem(id=response_item_id("fc"), call_id=call.id, name=call.function.name,
                                      arguments=call.function.arguments) for call in calls)
        return items

    # ------------------------------------------------------------ streaming
    async def _stream(self, response_id: str, req: ResponsesRequest, p: _Prepared,
                      stream: OutputStream, created_at: int) -> AsyncIterator[str]:
        writer = ResponseEventWriter()
        tracker = DeltaTracker(p.params.stop_str_buffer_length)
        parser = p.tools.new_parser() if p.tools else None
        final: RequestOutput | None = None
        try:
            started = self._response(response_id, req, p, [], None, created_at)
            yield writer.lifecycle("response.created", started)
            yield writer.lifecycle("response.in_progress", started)
            async for _, out in stream:
                delta = tracker.advance(out.outputs[0])
                final = out if out.finished else final
                if delta is None:
                    continue
                text, calls = delta.text, []
                if parser is not None:
                    parsed = parser.extract_tool_calls_streaming(delta.text, final=delta.finish_reason is not None)
                    text, calls = parsed.content, parsed.tool_calls
                logprobs = self._logprobs(p, delta.token_ids, delta.logprobs)
                for event in writer.add(text, calls, logprobs):
                    yield event
            if final is None:        # the stream ended without a finished output (aborted)
                return
            for event in writer.finish(final.outputs[0].finish_reason == "length"):
                yield event
            done = self._response(response_id, req, p, writer.items, final, created_at)
            yield writer.lifecycle(f"response.{done.status}", done)
        except APIError as exc:
            yield writer.error(responses_error(exc))
        finally:
            stream.abort()


def _usage(final: RequestOutput, completion: CompletionOutput) -> ResponseUsage:
    prompt, generated = len(final.prompt_token_ids), len(completion.token_ids)
    return ResponseUsage(input_tokens=prompt, output_tokens=generated, total_tokens=prompt + generated,
                         input_tokens_details=InputTokensDetails(cached_tokens=final.num_cached_tokens))


def _echo(req: ResponsesRequest, p: _Prepared) -> dict:
    """The request's parameters as OpenAI returns them on the response (sampling values as used)."""
    fmt = (req.text or {}).get("format") or {"type": "text"}
    return dict(instructions=req.instructions, max_output_tokens=req.max_output_tokens,
                metadata=req.metadata or {}, parallel_tool_calls=req.parallel_tool_calls is not False,
                temperature=p.params.temperature, top_p=p.params.top_p, text={"format": fmt},
                tool_choice=req.tool_choice if req.tool_choice is not None else "auto",
                tools=[{"description": None, "parameters": None, "strict": None, **tool} for tool in req.tools or []],
                user=req.user, truncation=req.truncation or "disabled",
                service_tier=req.service_tier or "default", top_logprobs=req.top_logprobs or 0)
