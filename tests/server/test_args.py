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


# a vLLM launch script's flags (vllm/engine/arg_utils.py and vllm/entrypoints/openai/cli_args.py names)
VLLM_SCRIPT_FLAGS = ["--disable-log-requests", "--disable-log-stats", "--enable-prefix-caching",
                     "--no-enable-prefix-caching", "--guided-decoding-backend", "xgrammar", "--trust-remote-code",
                     "--dtype", "auto", "--uvicorn-log-level", "info", "--max-num-batched-tokens", "2048",
                     "--block-size", "16", "--swap-space", "4", "--disable-frontend-multiprocessing",
                     "--enable-tokenizer-info-endpoint", "--disable-uvicorn-access-log", "--return-tokens-as-token-ids"]


def test_vllm_launch_script_flags_are_accepted():
    args = make_parser().parse_args(VLLM_SCRIPT_FLAGS)
    config = ServerConfig.from_args(args)
    assert config.disable_uvicorn_access_log and config.return_tokens_as_token_ids
    assert config.uvicorn_log_level == "info"
    engine_args = EngineArgs.from_cli_args(args)
    assert engine_args.enable_prefix_caching is False and engine_args.max_num_batched_tokens == 2048
    assert build_parser().parse_args(["serve", *VLLM_SCRIPT_FLAGS]).guided_decoding_backend == "xgrammar"


@pytest.mark.parametrize("argv,named", [
    (["--pipeline-parallel-size", "2"], "--pipeline-parallel-size"),
    (["--enable-lora"], "--enable-lora"),
    (["--guided-decoding-backend", "outlines"], "outlines"),
])
def test_unimplemented_flags_fail_naming_them(argv, named, capsys):
    with pytest.raises(SystemExit) as exc:
        make_parser().parse_args(argv)
    assert exc.value.code == 2 and named in capsys.readouterr().err


@pytest.mark.slow
def test_real_serve_command_rejects_an_unknown_flag_at_start_up():
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "ascend_llm.cli", "serve", "--disable-log-requests",
                           "--some-unknown-flag"], capture_output=True, text=True, timeout=120, cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 2 and "unrecognized arguments: --some-unknown-flag" in proc.stderr, proc.stderr
