"""Server command-line arguments (vLLM names, FastDeploy aliases) and the settings the app reads."""
from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ascend_llm.engine.arg_utils import EngineArgs
from ascend_llm.server.accuracy import add_accuracy_args
from ascend_llm.server.tool_parsers import TOOL_PARSERS

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_QUEUED_REQUESTS = 256


def add_server_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Engine flags (EngineArgs) plus HTTP, auth, admission and FastDeploy-compatibility flags."""
    EngineArgs.add_cli_args(parser)
    add_accuracy_args(parser)
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="bind address (default: %(default)s; use 0.0.0.0 deliberately)")
    add("--port", type=int, default=8000)
    add("--api-key", default=os.environ.get("ASCEND_LLM_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every route except /health and /metrics "
             "(default: $ASCEND_LLM_API_KEY)")
    add("--chat-template", default=None, help="chat template: a file path or the Jinja text itself")
    add("--metrics-port", type=int, default=None,
        help="also serve /metrics on this port (FastDeploy style); /metrics on --port always works")
    add("--max-num-queued-reqs", type=int, default=DEFAULT_MAX_QUEUED_REQUESTS,
        help="requests allowed to wait beyond --max-num-seqs; more get HTTP 429 (default: %(default)s)")
    add("--max-concurrency", type=int, default=None,
        help="FastDeploy alias: total admitted requests (running + waiting); overrides --max-num-queued-reqs")
    add("--max-request-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
        help="larger bodies get HTTP 413 (default: %(default)s)")
    add("--max-logprobs", type=int, default=20, help="cap on logprobs / top_logprobs (default: %(default)s)")
    add("--kv-cache-ratio", type=float, default=None,
        help="FastDeploy compatibility: accepted and ignored (this scheduler shares KV blocks between "
             "prefill and decode dynamically, with preemption)")
    add("--shutdown-timeout", type=float, default=30.0,
        help="on SIGTERM, seconds to let in-flight requests finish (default: %(default)s)")
    add("--engine-stall-timeout", type=float, default=120.0,
        help="/health returns 503 when one engine step takes longer than this (default: %(default)s)")
    add("--uvicorn-log-level", default="warning")
    add("--disable-uvicorn-access-log", action="store_true", help="no uvicorn access log lines")
    add("--return-tokens-as-token-ids", action="store_true",
        help="logprob tokens as 'token_id:N' unless a request sets return_tokens_as_token_ids (vLLM)")
    add_vllm_compat_args(parser)
    # tool calling (vLLM's flags): tool_choice "auto" needs both; "none", "required" and named work without
    add("--enable-auto-tool-choice", action="store_true",
        help="let the model decide when to call tools (tool_choice \"auto\"); needs --tool-call-parser")
    add("--tool-call-parser", default=None, choices=sorted(TOOL_PARSERS),
        help="the model's tool-call format: hermes (Hermes, Qwen2.5, Qwen3), llama3_json / llama4_json, "
             "mistral, pythonic, qwen3_coder / qwen3_xml, ernie45")
    add("--exclude-tools-when-tool-choice-none", action="store_true",
        help="leave the tools out of the prompt when tool_choice is \"none\" (default: rendered)")
    return parser


# vLLM flags whose effect this server already has (or that only grant a permission it never uses):
# accepted so vLLM launch scripts start unchanged. Every other unknown flag fails at start-up, naming it.
_VLLM_NO_OP_FLAGS = {
    "--disable-log-requests": "requests are never logged one by one here",
    "--disable-log-stats": "there is no periodic stats log line here (see /metrics)",
    "--disable-frontend-multiprocessing": "the HTTP frontend and the engine share one process here",
    "--enable-tokenizer-info-endpoint": "GET /tokenizer_info is always served",
    "--trust-remote-code": "a permission only: no checkpoint code is ever run (own model classes, tokenizers "
                           "load with trust_remote_code=False), so a model that needs its code fails to load",
}


def add_vllm_compat_args(parser: argparse.ArgumentParser) -> None:
    """vLLM launch-script flags: documented no-ops, plus the values that match what this server does."""
    group = parser.add_argument_group("vLLM compatibility (accepted; see each help for what it does here)")
    for flag, reason in _VLLM_NO_OP_FLAGS.items():
        group.add_argument(flag, action="store_true", help=f"no-op: {reason}")
    group.add_argument("--swap-space", type=float, default=None,
                       help="no-op: preempted sequences are recomputed, never swapped to CPU (as vLLM V1)")
    group.add_argument("--guided-decoding-backend", default="auto", choices=["auto", "xgrammar"],
                       help="structured-output backend; xgrammar is the only one (default: %(default)s)")


@dataclass
class ServerConfig:
    """What the HTTP layer needs from the command line (defaults suit tests)."""
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
    model: str | None = None
    chat_template: str | None = None
    metrics_port: int | None = None
    max_request_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_logprobs: int = 20
    max_pending_requests: int | None = None
    shutdown_timeout: float = 30.0
    engine_stall_timeout: float = 120.0
    uvicorn_log_level: str = "warning"
    disable_uvicorn_access_log: bool = False
    return_tokens_as_token_ids: bool = False
    max_model_len: int | None = None      # --max-model-len (engine flag): the metrics' token-count buckets
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    exclude_tools_when_tool_choice_none: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace | None) -> "ServerConfig":
        values = vars(args) if args is not None else {}
        known = {name: values[name] for name in cls.__dataclass_fields__ if name in values}
        config = cls(**known)
        config.chat_template = load_chat_template(config.chat_template)
        if "max_pending_requests" not in values:
            config.max_pending_requests = pending_limit(values)
        _check(config)
        return config


def pending_limit(values: dict) -> int | None:
    """Admission bound: --max-concurrency, else --max-num-seqs + --max-num-queued-reqs."""
    if values.get("max_concurrency") is not None:
        return int(values["max_concurrency"])
    queued = values.get("max_num_queued_reqs")
    if queued is None:
        return None
    return int(values.get("max_num_seqs") or EngineArgs.max_num_seqs) + int(queued)


def load_chat_template(value: str | None) -> str | None:
    """A template given as a path is read; anything else is the template text."""
    if value is None:
        return None
    if "{" not in value:
        path = Path(value).expanduser()
        if not path.is_file():
            raise ValueError(f"chat_template: {value!r} is neither a file nor a Jinja template")
        return path.read_text(encoding="utf-8")
    return value


def _check(config: ServerConfig) -> None:
    if not 0 < config.port < 65536:
        raise ValueError(f"port: must be in 1..65535, got {config.port}")
    if config.max_request_body_bytes <= 0:
        raise ValueError(f"max_request_body_bytes: must be > 0, got {config.max_request_body_bytes}")
    if config.max_pending_requests is not None and config.max_pending_requests < 1:
        raise ValueError(f"max_concurrency: must be >= 1, got {config.max_pending_requests}")
    if config.api_key is not None and not config.api_key:
        raise ValueError("api_key: must not be empty")
    if config.enable_auto_tool_choice and not config.tool_call_parser:
        raise ValueError("enable_auto_tool_choice: --enable-auto-tool-choice requires --tool-call-parser")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ascend_llm.server.api_server",
                                     description="OpenAI-compatible HTTP server for ascend-llm")
    parser.add_argument("--log-level", default="INFO")
    return add_server_args(parser)
