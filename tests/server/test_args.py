"""Server CLI: vLLM names, FastDeploy aliases, defaults, and the `ascend-llm serve` wiring."""
from __future__ import annotations

import pytest

from ascend_llm.cli import build_parser
from ascend_llm.engine.arg_utils import EngineArgs
from ascend_llm.server.args import DEFAULT_MAX_QUEUED_REQUESTS, ServerConfig, make_parser


def test_defaults_bind_loopback_and_serve_bundled_model(monkeypatch):
    monkeypatch.delenv("ASCEND_LLM_API_KEY", raising=False)
    args = make_parser().parse_args([])
    config = ServerConfig.from_args(args)
    assert (config.host, config.port, config.api_key) == ("127.0.0.1", 8000, None)
    assert EngineArgs.from_cli_args(args).model == EngineArgs().model
    assert config.max_pending_requests == EngineArgs().max_num_seqs + DEFAULT_MAX_QUEUED_REQUESTS


def test_fastdeploy_aliases():
    args = make_parser().parse_args(["--tp", "1", "--max-num-seqs", "4", "--kv-cache-ratio", "0.75",
                                     "--max-concurrency", "10", "--metrics-port", "9001",
                                     "--served-model-name", "m", "--quantization", "wint8",
                                     "--kv-cache-dtype", "auto", "--no-enable-prefix-caching"])
    engine_args = EngineArgs.from_cli_args(args)
    assert engine_args.tensor_parallel_size == 1 and engine_args.max_num_seqs == 4
    assert engine_args.quantization == "wint8" and engine_args.enable_prefix_caching is False
    config = ServerConfig.from_args(args)
    assert config.max_pending_requests == 10 and config.metrics_port == 9001 and config.served_model_name == "m"


def test_chat_template_from_file_or_text(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages[0]['content'] }}")
    assert ServerConfig.from_args(make_parser().parse_args(["--chat-template", str(path)])).chat_template \
        == "{{ messages[0]['content'] }}"
    inline = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert ServerConfig.from_args(make_parser().parse_args(["--chat-template", inline])).chat_template == inline
    with pytest.raises(ValueError, match="chat_template"):
        ServerConfig.from_args(make_parser().parse_args(["--chat-template", str(tmp_path / "missing")]))


def test_bad_values_are_value_errors():
    with pytest.raises(ValueError, match="port"):
        ServerConfig.from_args(make_parser().parse_args(["--port", "70000"]))
    with pytest.raises(ValueError, match="max_concurrency"):
        ServerConfig.from_args(make_parser().parse_args(["--max-concurrency", "0"]))


def test_cli_serve_subcommand_uses_server_args():
    args = build_parser().parse_args(["serve", "--port", "9000", "--api-key", "k", "--tp", "1"])
    assert args.port == 9000 and args.api_key == "k" and args.host == "127.0.0.1"
    assert args.func.__name__ == "cmd_serve"


def test_chat_template_flag_is_used(client, tiny_llama_dir):
    from fastapi.testclient import TestClient

    from ascend_llm.server.app import build_app
    from tests.server.conftest import make_engine, server_args
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    app = build_app(make_engine(tiny_llama_dir), server_args(tiny_llama_dir, "--chat-template", template))
    with TestClient(app) as c:
        tokens = c.post("/tokenize", json={"messages": [{"role": "user", "content": "The quick"}]}).json()["tokens"]
        plain = c.post("/tokenize", json={"prompt": "The quick", "add_special_tokens": False}).json()["tokens"]
    assert tokens == plain
