"""POST /v1/completions: prompts (text or token ids, one or a batch), streaming or not."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi.responses import JSONResponse, StreamingResponse

from ascend_llm.outputs import CompletionOutput, RequestOutput
from ascend_llm.sampling_params import SamplingParams
from ascend_llm.server.errors import APIError, bad_request
from ascend_llm.server.logprobs import completion_logprobs, prompt_logprobs_json
from ascend_llm.server.protocol import (CompletionChoice, CompletionRequest, CompletionResponse, UsageInfo,
                                        random_id)
from ascend_llm.server.serving_engine import (MAX_PROMPTS_PER_REQUEST, OutputStream, PromptInput,
                                              ServingContext)
from ascend_llm.server.streaming import DONE, SSE_HEADERS, DeltaTracker, sse, sse_error
from ascend_llm.server.structured_request import structured_renames


@dataclass
class _Prepared:
    """A validated completion request, ready to submit."""
    request: CompletionRequest
    model: str
    prompts: list[PromptInput]
    params: list[SamplingParams]
    echo_only: bool = False     # echo with max_tokens 0: the prompt (and its logprobs) and nothing generated


class CompletionServing:
    """Validates completion requests, runs them on the engine, formats the responses."""

    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create(self, req: CompletionRequest) -> JSONResponse | StreamingResponse:
        prepared = self.prepare(req)
        request_id = random_id("cmpl")
        stream = await self.ctx.submit(request_id, prepared.prompts, prepared.params,
                                       renames=structured_renames(req))
        if req.stream:
            return StreamingResponse(self._stream(request_id, prepared, stream),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        finals = await stream.collect()
        return JSONResponse(self._response(request_id, prepared, finals).model_dump())

    # ---------------------------------------------------------- validation
    def prepare(self, req: CompletionRequest) -> _Prepared:
        model = self.ctx.check_model(req.model)
        if req.suffix:
            raise bad_request("suffix: not supported", "suffix")
        prompts = [self._prompt_input(p) for p in normalize_prompt(req.prompt)]
        # as vLLM and legacy OpenAI: echo + max_tokens 0 scores the prompt; one token is generated and dropped
        echo_only = req.echo and req.max_tokens == 0
        requested = 1 if echo_only else req.max_tokens
        params = []
        for prompt in prompts:
            max_tokens = self.ctx.resolve_max_tokens(requested, len(prompt.token_ids), "prompt", "max_tokens")
            prompt_lp = req.logprobs if req.echo and req.logprobs is not None else req.prompt_logprobs
            params.append(self.ctx.sampling_params(req, max_tokens, req.logprobs, prompt_logprobs=prompt_lp))
        return _Prepared(req, model, prompts, params, echo_only)

    def _prompt_input(self, prompt: str | list[int]) -> PromptInput:
        if isinstance(prompt, str):
            return PromptInput(prompt, self.ctx.encode(prompt, "prompt"))
        ids = self.ctx.check_token_ids(prompt, "prompt")
        return PromptInput(None, ids)

    def _prompt_text(self, prompt: PromptInput) -> str:
        if prompt.text is not None:
            return prompt.text
        return self.ctx.tokenizer.decode(prompt.token_ids)

    # ------------------------------------------------------------ response
    def _response(self, request_id: str, p: _Prepared, finals: list[RequestOutput]) -> CompletionResponse:
        choices = []
        n = p.params[0].n
        for i, out in enumerate(finals):
            prefix = self._prompt_text(p.prompts[i]) if p.request.echo else ""
            for c in out.outputs:
                text = prefix if p.echo_only else prefix + c.text
                choices.append(CompletionChoice(index=i * n + c.index, text=text,
                                                logprobs=self._choice_logprobs(p, out, c),
                                                finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                                                prompt_logprobs=prompt_logprobs_json(out.prompt_logprobs)))
        return CompletionResponse(id=request_id, model=p.model, choices=choices,
                                  usage=usage(finals, p.echo_only))

    def _choice_logprobs(self, p: _Prepared, out: RequestOutput, c: CompletionOutput) -> Any:
        """Logprobs of the generated tokens, preceded by the prompt's under echo."""
        ids, entries = self._echoed(p, out, c.token_ids, c.logprobs)
        return self._logprobs(p, ids, entries)

    @staticmethod
    def _echoed(p: _Prepared, out: RequestOutput, ids: list[int], entries: Any) -> tuple[list[int], Any]:
        """Token ids and logprob entries with the prompt's in front (only the prompt's under echo_only)."""
        if p.echo_only:
            return out.prompt_token_ids, out.prompt_logprobs
        if out.prompt_logprobs is not None and entries is not None:
            return out.prompt_token_ids + ids, out.prompt_logprobs + entries
        return ids, entries

    def _logprobs(self, p: _Prepared, token_ids: list[int], logprobs: Any, offset: int = 0) -> Any:
        if p.request.logprobs is None or logprobs is None:
            return None
        return completion_logprobs(token_ids, logprobs, p.request.logprobs, self.ctx.tokenizer, offset,
                                   as_token_ids=self.ctx.tokens_as_ids(p.request))

    async def _stream(self, request_id: str, p: _Prepared, stream: OutputStream) -> AsyncIterator[str]:
        created, n = int(time.time()), p.params[0].n
        trackers = {(i, j): DeltaTracker(p.params[i].stop_str_buffer_length)
                    for i in range(len(p.prompts)) for j in range(n)}
        offsets: dict[tuple[int, int], int] = {}
        finals: dict[int, RequestOutput] = {}
        try:
            async for i, out in stream:
                for c in out.outputs:
                    chunk = self._chunk(request_id, created, p, i, out, c, trackers[(i, c.index)], offsets)
                    if chunk is not None:
                        yield chunk
                if out.finished:
                    finals[i] = out
            if p.request.stream_options and p.request.stream_options.include_usage:
                yield sse(CompletionResponse(id=request_id, created=created, model=p.model, choices=[],
                                             usage=usage(list(finals.values()), p.echo_only)))
        except APIError as exc:
            yield sse_error(exc)
        finally:
            stream.abort()
        yield DONE

    def _chunk(self, request_id: str, created: int, p: _Prepared, i: int, out: RequestOutput, c: CompletionOutput,
               tracker: DeltaTracker, offsets: dict[tuple[int, int], int]) -> str | None:
        first = tracker.sent_tokens == 0 and tracker.sent_chars == 0
        if p.echo_only and c.finish_reason is None:
            return None
        delta = tracker.advance(c)
        if delta is None:
            return None
        text, ids, entries = ("", [], None) if p.echo_only else (delta.text, delta.token_ids, delta.logprobs)
        if first and p.request.echo:
            text = self._prompt_text(p.prompts[i]) + text
            ids, entries = self._echoed(p, out, ids, entries)
        key = (i, c.index)
        logprobs = self._logprobs(p, ids, entries, offsets.get(key, 0))
        if logprobs is not None and logprobs.tokens:
            offsets[key] = logprobs.end_offset
        choice = CompletionChoice(index=i * p.params[i].n + c.index, text=text, logprobs=logprobs,
                                  finish_reason=delta.finish_reason, stop_reason=delta.stop_reason)
        opts = p.request.stream_options
        continuous = bool(opts and opts.include_usage and opts.continuous_usage_stats)
        return sse(CompletionResponse(id=request_id, created=created, model=p.model, choices=[choice],
                                      usage=usage([out], p.echo_only) if continuous else None))


def normalize_prompt(prompt: Any) -> list[str | list[int]]:
    """`prompt` as a list of engine prompts; 400 for anything else."""
    if prompt is None:
        raise bad_request("prompt: is required", "prompt")
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise bad_request("prompt: must be a non-empty string, list of strings, token ids, "
                          "or list of token id lists", "prompt")
    if all(isinstance(x, int) and not isinstance(x, bool) for x in prompt):
        return [prompt]
    if all(isinstance(x, str) for x in prompt) or all(isinstance(x, list) for x in prompt):
        if len(prompt) > MAX_PROMPTS_PER_REQUEST:
            raise bad_request(f"prompt: at most {MAX_PROMPTS_PER_REQUEST} prompts per request, "
                              f"got {len(prompt)}", "prompt")
        return list(prompt)
    raise bad_request("prompt: mixes strings, token ids and lists; use one kind", "prompt")


def usage(finals: list[RequestOutput], prompt_only: bool = False) -> UsageInfo:
    """Token counts of `finals` (so far, for outputs still running); `prompt_only` counts no completion."""
    prompt = sum(len(out.prompt_token_ids) for out in finals)
    completion = 0 if prompt_only else sum(len(c.token_ids) for out in finals for c in out.outputs)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
