"""The `ascend-llm` command line on a tiny model."""
from __future__ import annotations

import subprocess
import sys


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ascend_llm.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_generate_prints_the_greedy_continuation(tiny_llama_dir):
    from ascend_llm import LLM, SamplingParams
    want = LLM(str(tiny_llama_dir)).generate("The quick brown", SamplingParams(temperature=0, max_tokens=8),
                                             use_tqdm=False)[0].outputs[0].text
    proc = run_cli("generate", "--model", str(tiny_llama_dir), "--prompt", "The quick brown", "--max-tokens", "8")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == want + "\n"
    assert "Loading weights" in proc.stderr          # progress bar while loading


def test_chat_non_interactive(tiny_llama_dir):
    proc = run_cli("chat", "--model", str(tiny_llama_dir), "--message", "hi", "--message", "again",
                   "--max-tokens", "4")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) >= 2


def test_bad_model_path_is_a_clear_error(tmp_path):
    proc = run_cli("generate", "--model", str(tmp_path / "nope"), "--prompt", "x")
    assert proc.returncode == 2
    assert "local" in proc.stderr and "Traceback" not in proc.stderr


def test_invalid_sampling_value_is_a_clear_error(tiny_llama_dir):
    proc = run_cli("generate", "--model", str(tiny_llama_dir), "--prompt", "x", "--temperature", "nan")
    assert proc.returncode == 2
    assert "temperature" in proc.stderr and "Traceback" not in proc.stderr


def test_serve_without_server_dependencies_fails_cleanly(monkeypatch, caplog):
    from ascend_llm import cli
    monkeypatch.setitem(sys.modules, "ascend_llm.server.args", None)   # import now raises ImportError
    args = cli.build_parser().parse_args(["serve"])
    assert args.func(args) == 2
    assert "the server is unavailable" in caplog.text
