"""What every OpenAI endpoint shares: model resolution, prompt checks, sampling-parameter
validation, admission of a batch of engine requests and iteration over their outputs."""
from __future__ import annotations

import asyncio
import copy
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator

from ascend_llm.engine.async_engine import (AsyncLLMEngine, EngineOverloadedError, EngineStepError,
                                            EngineUnavailableError)
from ascend_llm.outputs import RequestOutput
from ascend_llm.sampling_params import SamplingParams
from ascend_llm.server.args import ServerConfig
from ascend_llm.server.errors import APIError, bad_request, from_value_error
from ascend_llm.server.structured_request import constraint_kwargs

logger = logging.getLogger(__name__)

MAX_PROMPTS_PER_REQUEST = 64
MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 512
MAX_STOP_TOKEN_IDS = 128
MAX_TEMPERATURE = 2.0
LOGPROB_FLOOR = -9999.0


@dataclass
class PromptInput:
    """One engine prompt: its text (for echo / logs) and its token ids."""
    text: str | None
    token_ids: list[int]


class ServingContext:
    """Engine, settings and a server-side tokenizer copy, shared by the endpoint handlers."""

    def __init__(self, engine: AsyncLLMEngine, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self._tokenizer: Any = None
        self.metrics: Any = None        # ServerMetrics, once attached: admitted requests' parameters

    @property
    def llm(self) -> Any:
        """The LLMEngine (503 while loading). Read-only attributes only: the engine thread owns it."""
        try:
            return self.engine.engine
        except EngineUnavailableError as exc:
            raise APIError(503, str(exc)) from None

    @property
    def tokenizer(self) -> Any:
        """A private copy, so request threads never share tokenizer state with the engine thread."""
        if self._tokenizer is None:
            base = self.llm.tokenizer
            try:
                self._tokenizer = copy.deepcopy(base)
            except Exception:  # some tokenizers cannot be copied; sharing is still correct
                self._tokenizer = base
        return self._tokenizer

    @property
    def served_model_name(self) -> str:
        return self.config.served_model_name or self.llm.served_model_name

    @property
    def model_aliases(self) -> set[str]:
        names = {self.served_model_name, self.llm.served_model_name}
        if self.config.model:
            names.add(self.config.model)
        return names

    @property
    def max_model_len(self) -> int:
        """The longest sequence (prompt + output) the engine can hold."""
        llm = self.llm
        limit = llm.max_model_len
        scheduler = getattr(llm, "scheduler", None)
        return min(limit, getattr(scheduler, "max_seq_len", limit))

    def check_model(self, name: str | None) -> str:
        """The served name for `name`; None means the (only) served model. 404 if unknown."""
        if name is None or name in self.model_aliases:
            return self.served_model_name
        raise APIError(404, f"The model `{name}` does not exist; this server serves "
                            f"`{self.served_model_name}`.", "model", "not_found_error")

    def tokens_as_ids(self, req: Any) -> bool:
        """`return_tokens_as_token_ids`: the request's choice, else --return-tokens-as-token-ids."""
        chosen = req.return_tokens_as_token_ids
        return self.config.return_tokens_as_token_ids if chosen is None else chosen

    # ------------------------------------------------------------- prompts
    def check_token_ids(self, ids: Any, param: str) -> list[int]:
        vocab = self.llm.vocab_size
        if not isinstance(ids, list) or not ids:
            raise bad_request(f"{param}: must be a non-empty list of token ids", param)
        bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise bad_request(f"{param}: token ids {bad[:5]} are outside the vocabulary [0, {vocab})", param)
        return ids

    def encode(self, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
        if not text:
            raise bad_request(f"{param}: must not be empty", param)
        ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        if not ids:
            raise bad_request(f"{param}: encodes to zero tokens", param)
        return ids

    def resolve_max_tokens(self, requested: int | None, prompt_len: int, prompt_param: str,
                           tokens_param: str) -> int:
        """Output budget: the request's, checked against the context, or what the context leaves."""
        limit = self.max_model_len
        if prompt_len >= limit:
            raise bad_request(f"This model's maximum context length is {limit} tokens. However, your prompt "
                              f"has {prompt_len} tokens, leaving no room for output. Please reduce the "
                              f"length of the prompt.", prompt_param)
        if requested is None:
            return limit - prompt_len
        if requested < 1:
            raise bad_request(f"{tokens_param}: must be >= 1, got {requested}", tokens_param)
        if prompt_len + requested > limit:
            raise bad_request(f"This model's maximum context length is {limit} tokens. However, you requested "
                              f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} in "
                              f"the completion). Please reduce the length of the prompt or {tokens_param}.",
                              tokens_param)
        return requested

    # ------------------------------------------------------------ sampling
    def sampling_params(self, req: Any, max_tokens: int, logprobs: int | None,
                        renames: dict[str, str] | None = None, **overrides: Any) -> SamplingParams:
        """SamplingParams for `req`; every bad value is a 400 naming the request field."""
        check_request_fields(req, self.llm.vocab_size)
        kwargs = {name: getattr(req, name) for name in _SAMPLING_FIELDS if getattr(req, name) is not None}
        kwargs.update(constraint_kwargs(req))
        kwargs.update(max_tokens=max_tokens, logprobs=logprobs, **overrides)
        for name in ("logprobs", "prompt_logprobs"):
            value = kwargs.get(name)
            if value is not None and not isinstance(value, bool) and value > self.config.max_logprobs:
                shown = (renames or {}).get(name, name)
                raise bad_request(f"{shown}: must be <= {self.config.max_logprobs}, got {value}", shown)
        try:
            return SamplingParams(**kwargs)
        except ValueError as exc:
            raise from_value_error(exc, renames=renames) from None

    # ----------------------------------------------------------- admission
    async def submit(self, request_id: str, prompts: list[PromptInput], params: list[SamplingParams], *,
                     renames: dict[str, str] | None = None) -> "OutputStream":
        """Admit one engine request per prompt (all or none); 429 / 503 / 400 on refusal. `renames`
        maps an engine error's parameter to the request field to name (e.g. structured_outputs ->
        response_format)."""
        out_queue: asyncio.Queue = asyncio.Queue()
        ids: list[str] = []
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                rid = f"{request_id}-{i}"
                await self.engine.add_request(rid, prompt.text, p, prompt.token_ids, out_queue=out_queue)
                ids.append(rid)
        except BaseException as exc:
            for rid in ids:
                self.engine.abort(rid)
            if isinstance(exc, Exception):
                raise admission_error(exc, renames) from None
            raise
        if self.metrics is not None:
            for p in params:
                self.metrics.record_params(p.n, p.max_tokens)
        return OutputStream(self.engine, out_queue, ids)


_SAMPLING_FIELDS = ("n", "best_of", "temperature", "top_p", "top_k", "min_p", "presence_penalty",
                    "frequency_penalty", "repetition_penalty", "seed", "stop", "stop_token_ids",
                    "ignore_eos", "min_tokens", "skip_special_tokens", "include_stop_str_in_output",
                    "prompt_logprobs")


def check_request_fields(req: Any, vocab_size: int) -> None:
    """Checks beyond SamplingParams: OpenAI ranges, resource caps, unsupported features."""
    if req.stream_options is not None and not req.stream:
        raise bad_request("Stream options can only be defined when `stream=True`.", "stream_options")
    if req.temperature is not None and not 0.0 <= req.temperature <= MAX_TEMPERATURE:
        raise bad_request(f"temperature: must be in [0, {MAX_TEMPERATURE}], got {req.temperature}", "temperature")
    if req.best_of is not None and req.best_of != req.n:     # as vLLM V1: best_of equal to n is the only choice
        raise bad_request(f"best_of: only best_of == n ({req.n}) is supported (no re-ranking of extra samples), "
                          f"got {req.best_of}", "best_of")
    if req.use_beam_search:
        raise bad_request("use_beam_search: beam search is not supported by this server", "use_beam_search")
    if req.store:
        raise bad_request("store: this server does not store completions", "store")
    _check_stop(req.stop)
    ids = req.stop_token_ids or []
    if len(ids) > MAX_STOP_TOKEN_IDS:
        raise bad_request(f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS} allowed, got {len(ids)}", "stop_token_ids")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise bad_request(f"stop_token_ids: {bad[:5]} are outside the vocabulary [0, {vocab_size})",
                          "stop_token_ids")


def _check_stop(stop: str | list[str] | None) -> None:
    items = [stop] if isinstance(stop, str) else (stop or [])
    if len(items) > MAX_STOP_SEQUENCES:
        raise bad_request(f"stop: at most {MAX_STOP_SEQUENCES} stop sequences allowed, got {len(items)}", "stop")
    for item in items:
        if not item:
            raise bad_request("stop: stop sequences must be non-empty strings", "stop")
        if len(item) > MAX_STOP_LENGTH:
            raise bad_request(f"stop: each stop sequence must be at most {MAX_STOP_LENGTH} characters, "
                              f"got {len(item)}", "stop")


def admission_error(exc: Exception, renames: dict[str, str] | None = None) -> APIError:
    """The HTTP error for an engine refusal."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineOverloadedError):
        return APIError(429, str(exc), err_type="rate_limit_error", headers={"Retry-After": "1"})
    if isinstance(exc, EngineUnavailableError):
        return APIError(503, str(exc), headers={"Retry-After": "5"})
    if isinstance(exc, ValueError):
        return from_value_error(exc, default_param="prompt", renames=renames)
    logger.exception("request admission failed")
    return APIError(500, f"internal error: {type(exc).__name__}")


class OutputStream:
    """Outputs of a batch of engine requests that share a queue: yields (prompt index, output)."""

    def __init__(self, engine: AsyncLLMEngine, out_queue: asyncio.Queue, request_ids: list[str]) -> None:
        self._engine = engine
        self._queue = out_queue
        self._index = {rid: i for i, rid in enumerate(request_ids)}
        self._pending = set(request_ids)

    def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        while self._pending:
            item = await self._queue.get()
            if isinstance(item, EngineStepError):
                raise APIError(500, str(item))
            if isinstance(item, BaseException):
                raise admission_error(item) if isinstance(item, Exception) else item
            if item.request_id not in self._pending:
                continue
            if item.finished:
                self._pending.discard(item.request_id)
            if item.error is not None:      # this request failed alone (like vLLM's GenerationError)
                raise APIError(500, f"request {item.request_id} failed: {item.error}")
            yield self._index[item.request_id], item

    def abort(self) -> None:
        """Abort whatever has not finished (client gone, or an error)."""
        for rid in list(self._pending):
            self._engine.abort(rid)
        self._pending.clear()

    async def collect(self) -> list[RequestOutput]:
        """Final output of every request, in prompt order; aborts the rest on any exit."""
        final: dict[int, RequestOutput] = {}
        try:
            async for index, out in self:
                if out.finished:
                    final[index] = out
        finally:
            self.abort()
        return [final[i] for i in sorted(final)]


def clamp_logprob(value: float) -> float:
    """JSON has no -inf: clamp like vLLM does."""
    return max(value, LOGPROB_FLOOR)
