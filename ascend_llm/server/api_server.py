"""`python -m ascend_llm.server.api_server` / `ascend-llm serve`: uvicorn over `build_app`.

The HTTP port opens at once and the model loads on the engine thread (/health is 503
until it is ready). SIGTERM / SIGINT drain: new requests get 503, in-flight ones finish
(up to --shutdown-timeout), then the process exits 0.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
from types import FrameType
from typing import Sequence

import uvicorn

from ascend_llm.engine.arg_utils import EngineArgs
from ascend_llm.engine.async_engine import AsyncLLMEngine, EngineState
from ascend_llm.platform import bound_onednn_caches
from ascend_llm.eval.accuracy_reference import AccuracyReferenceError
from ascend_llm.loader import resolve_model_path
from ascend_llm.server.accuracy import AccuracyGuard, install
from ascend_llm.server.app import build_app
from ascend_llm.server.args import ServerConfig, make_parser
from ascend_llm.server.exit_deadline import EXIT_MARGIN_S, arm_exit_deadline

logger = logging.getLogger("ascend_llm.server")

_ENDPOINTS = (("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/responses"),
              ("POST", "/v1/embeddings"), ("GET", "/v1/models"), ("GET", "/v1/models/{model_id}"),
              ("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/tokenizer_info"), ("GET", "/health"),
              ("GET", "/version"), ("GET", "/metrics"))


_ENGINE_MARGIN_S = 1.0


class _DrainingServer(uvicorn.Server):
    """uvicorn.Server that tells the engine to stop admitting requests when a signal arrives,
    drains the engine alongside uvicorn's graceful wait, and exits normally afterwards instead
    of re-raising the signal. The first signal also arms the exit deadline (drain time plus
    EXIT_MARGIN_S): past it the process ends with its stacks on stderr, never hangs."""

    def __init__(self, config: uvicorn.Config, engine: AsyncLLMEngine, drain_timeout: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.drain_timeout = drain_timeout
        self._deadline_armed = False

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's shutdown (stop accepting, wait up to the grace for in-flight responses, cancel
        the rest) with the engine drained on a worker thread meanwhile, on a slightly earlier
        deadline. Left to uvicorn alone, a stream still running at the deadline is cut off mid-body,
        and its engine request keeps computing for nobody while the process winds down (the engine
        thread may then still be inside a forward pass at interpreter exit: SIGABRT). Drained
        here, such a request is failed by the engine, so its stream ends with an SSE error event
        and [DONE] before uvicorn would cancel it, and the engine thread is stopped and joined."""
        drain = asyncio.create_task(asyncio.to_thread(self.engine.shutdown,
                                                      _engine_drain_timeout(self.drain_timeout)))
        try:
            await super().shutdown(sockets)
        finally:
            await drain

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        logger.info("received signal %d: draining (in-flight requests finish, new ones get 503)", sig)
        if not self._deadline_armed:
            self._deadline_armed = arm_exit_deadline(self.drain_timeout + EXIT_MARGIN_S)
        self.engine.begin_drain()
        super().handle_exit(sig, frame)
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list):
            captured.clear()


def run_server(args: argparse.Namespace) -> int:
    """Serve until SIGTERM / SIGINT; 0 on a clean shutdown, 1 if the engine failed."""
    bound_onednn_caches()     # before the engine thread's first oneDNN call: RSS stays bounded
    config = ServerConfig.from_args(args)
    engine_args = EngineArgs.from_cli_args(args)
    if getattr(args, "kv_cache_ratio", None) is not None:
        logger.warning("--kv-cache-ratio %s is accepted for FastDeploy compatibility and ignored: KV blocks "
                       "are shared between prefill and decode dynamically", args.kv_cache_ratio)
    try:
        guard = AccuracyGuard.from_args(args, resolve_model_path(engine_args.model))
    except AccuracyReferenceError as exc:
        logger.error("--verify-accuracy: %s", exc)
        return 2
    engine = AsyncLLMEngine.from_engine_args(engine_args, max_pending_requests=config.max_pending_requests,
                                             stall_timeout_s=config.engine_stall_timeout,
                                             on_load=guard.check if guard else None)
    app = build_app(engine, config)
    if guard is not None:
        install(app, guard)
    uv_config = uvicorn.Config(app, host=config.host, port=config.port, log_level=config.uvicorn_log_level,
                               access_log=not config.disable_uvicorn_access_log,
                               timeout_graceful_shutdown=config.shutdown_timeout, lifespan="on")
    server = _DrainingServer(uv_config, engine, config.shutdown_timeout)
    engine.on_fatal = lambda reason: setattr(server, "should_exit", True)
    metrics_server = _start_metrics_server(app, config)
    _log_endpoints(config, engine_args)
    try:
        server.run()
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
    if engine.state is EngineState.FAILED:
        logger.error("engine failed: %s", engine.health()[1])
        return 1
    logger.info("server stopped")
    return 0


def _engine_drain_timeout(grace: float) -> float:
    """How long the engine lets in-flight requests run after a signal: uvicorn's grace less a
    margin in which the requests it then fails can still send their final event."""
    return max(0.0, grace - min(_ENGINE_MARGIN_S, grace / 5))


def _start_metrics_server(app, config: ServerConfig):
    if config.metrics_port is None:
        return None
    from prometheus_client import start_http_server
    registry = app.state.handlers.metrics.registry
    server, _ = start_http_server(config.metrics_port, addr=config.host, registry=registry)
    return server


def _log_endpoints(config: ServerConfig, engine_args: EngineArgs) -> None:
    base = f"http://{_url_host(config.host)}:{config.port}"
    logger.info("ascend-llm OpenAI-compatible server for %s (served as %s) at %s", engine_args.model,
                config.served_model_name or engine_args.model, base)
    for method, path in _ENDPOINTS:
        logger.info("  %-4s %s%s", method, base, path)
    if config.metrics_port is not None:
        logger.info("  GET  http://%s:%d/metrics (metrics port)", _url_host(config.host), config.metrics_port)
    logger.info("API key required: %s; the model loads in the background (/health is 503 until ready)",
                "yes" if config.api_key else "no")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run_server(args)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
