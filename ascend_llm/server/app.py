"""The FastAPI application: routes, error handlers, auth, lifespan. Built by `build_app(engine, args)`."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ascend_llm import __version__
from ascend_llm.engine.async_engine import AsyncLLMEngine, EngineUnavailableError
from ascend_llm.server.args import ServerConfig
from ascend_llm.server.auth import APIKeyMiddleware
from ascend_llm.server.body import parse_request
from ascend_llm.server.disconnect import cancel_on_disconnect
from ascend_llm.server.errors import APIError, error_body
from ascend_llm.server.metrics import ServerMetrics
from ascend_llm.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, EmbeddingRequest,
                                        TokenizeRequest)
from ascend_llm.server.quantization import QuantizationCollector, quantization_report
from ascend_llm.server.responses_protocol import ResponsesRequest
from ascend_llm.server.serving_chat import ChatServing
from ascend_llm.server.serving_completion import CompletionServing
from ascend_llm.server.serving_embedding import EmbeddingServing
from ascend_llm.server.serving_engine import ServingContext, admission_error
from ascend_llm.server.serving_models import list_models, retrieve_model
from ascend_llm.server.serving_responses import ResponsesServing
from ascend_llm.server.serving_tokenize import TokenizeServing

logger = logging.getLogger(__name__)

CLIENT_CLOSED = 499
_DEFAULT_BUCKET_LEN = 131072    # token-count buckets up to 100k when the context length is not known yet


class ServerHandlers:
    """Everything the routes use, built once per app (no module-level state)."""

    def __init__(self, engine: AsyncLLMEngine, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.ctx = ServingContext(engine, config)
        self.completion = CompletionServing(self.ctx)
        self.chat = ChatServing(self.ctx)
        self.responses = ResponsesServing(self.ctx, self.chat)
        self.embedding = EmbeddingServing(self.ctx)
        self.tokenize = TokenizeServing(self.ctx, self.chat)
        self.metrics: ServerMetrics | None = None

    def attach_metrics(self, model_name: str) -> ServerMetrics:
        self.metrics = ServerMetrics(model_name, self.engine.stats, _max_model_len(self.engine, self.config),
                                     lambda: cache_config_info(self.engine))
        self.engine.add_stats_listener(self.metrics)
        self.metrics.registry.register(QuantizationCollector(lambda: _quantization_audit(self.engine), model_name))
        self.ctx.metrics = self.metrics
        return self.metrics


def _quantization_audit(engine: Any) -> list:
    """The engine's per-layer audit (empty for an engine without a model, e.g. a test double)."""
    audit = getattr(getattr(engine, "engine", None), "quantization_audit", None)
    return audit() if audit is not None else []


def build_app(engine: Any, args: argparse.Namespace | ServerConfig | None = None) -> FastAPI:
    """The OpenAI-compatible app over `engine` (an AsyncLLMEngine, or an LLMEngine to wrap)."""
    config = args if isinstance(args, ServerConfig) else ServerConfig.from_args(args)
    if not isinstance(engine, AsyncLLMEngine):
        engine = AsyncLLMEngine(engine, max_pending_requests=config.max_pending_requests,
                                stall_timeout_s=config.engine_stall_timeout)
    handlers = ServerHandlers(engine, config)
    handlers.attach_metrics(config.served_model_name or _engine_name(engine) or config.model or "unknown")
    app = FastAPI(title="ascend-llm OpenAI-compatible server", version=__version__,
                  lifespan=_lifespan(handlers))
    app.state.handlers = handlers
    _add_error_handlers(app)
    _add_system_routes(app, handlers)
    _add_openai_routes(app, handlers)
    if config.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key)
    return app


def _engine_name(engine: AsyncLLMEngine) -> str | None:
    try:
        return engine.engine.served_model_name
    except Exception:  # still loading: the label is fixed at build time
        return None


def _max_model_len(engine: AsyncLLMEngine, config: ServerConfig) -> int:
    """For the token-count histogram buckets; the engine's limit once loaded, else the configured one."""
    try:
        return engine.engine.max_model_len
    except Exception:  # still loading
        return config.max_model_len or _DEFAULT_BUCKET_LEN


def cache_config_info(engine: AsyncLLMEngine) -> dict[str, str] | None:
    """vLLM's `cache_config_info` labels: the KV cache configuration as strings (None while loading)."""
    try:
        llm = engine.engine
    except Exception:  # still loading
        return None
    config = llm.cache_config
    info = {f.name: str(getattr(config, f.name)) for f in dataclasses.fields(config)}
    info["num_gpu_blocks"] = str(llm.scheduler.block_manager.num_blocks)
    return info


def _lifespan(handlers: ServerHandlers) -> Any:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        handlers.engine.start()
        try:
            yield
        finally:
            handlers.engine.shutdown(timeout=handlers.config.shutdown_timeout)
    return lifespan


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return JSONResponse(error_body(500, f"internal server error: {type(exc).__name__}"), status_code=500)


def _add_system_routes(app: FastAPI, h: ServerHandlers) -> None:
    @app.get("/health")
    @app.get("/ping")
    async def health() -> Response:
        ok, reason = h.engine.health()
        if ok:
            return Response(status_code=200)
        return JSONResponse(error_body(503, reason), status_code=503)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        content, media_type = h.metrics.render()
        return Response(content, media_type=media_type)


def _add_openai_routes(app: FastAPI, h: ServerHandlers) -> None:
    limit = h.config.max_request_body_bytes

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse(list_models(h.ctx).model_dump())

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> JSONResponse:
        return JSONResponse(retrieve_model(h.ctx, model_id).model_dump())

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = await parse_request(request, CompletionRequest, limit)
        return _or_closed(await cancel_on_disconnect(request, h.completion.create(req)))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = await parse_request(request, ChatCompletionRequest, limit)
        return _or_closed(await cancel_on_disconnect(request, h.chat.create(req)))

    @app.post("/v1/responses")
    async def responses(request: Request) -> Response:
        req = await parse_request(request, ResponsesRequest, limit)
        return _or_closed(await cancel_on_disconnect(request, h.responses.create(req)))

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        req = await parse_request(request, EmbeddingRequest, limit)
        response = await cancel_on_disconnect(request, h.embedding.create(req))
        return _or_closed(None if response is None else JSONResponse(response.model_dump()))

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        req = await parse_request(request, TokenizeRequest, limit)
        return JSONResponse(h.tokenize.tokenize(req).model_dump())

    @app.get("/v1/quantization")
    async def quantization() -> JSONResponse:
        try:
            return JSONResponse(quantization_report(h.engine.engine))
        except EngineUnavailableError as exc:      # loading: 503 with Retry-After, like requests
            raise admission_error(exc) from None

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> JSONResponse:
        return JSONResponse(h.tokenize.tokenizer_info())

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        req = await parse_request(request, DetokenizeRequest, limit)
        return JSONResponse(h.tokenize.detokenize(req).model_dump())


def _or_closed(response: Response | None) -> Response:
    return response if response is not None else Response(status_code=CLIENT_CLOSED)
