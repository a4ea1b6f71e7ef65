"""Tensor parallelism through the engine: LLM(..., tensor_parallel_size=2) with the mp executor
(worker processes over gloo), worker death and start-up failures, bad configurations."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from ascend_llm import LLM, SamplingParams
from ascend_llm.executor.errors import WorkerDiedError
from ascend_llm.loader import load_hf_config
from ascend_llm.executor.launch import validate_tp_config
from ascend_llm.distributed.parallel_state import free_port

ROOT = Path(__file__).resolve().parents[2]
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
PROMPTS = [[5, 17, 33, 101], [300, 12, 9, 77, 150, 4, 4], [42] * 20]


def _generate(llm: LLM) -> tuple[list[list[int]], list[float]]:
    outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY, use_tqdm=False)
    lps = [entry[tok].logprob for p, o in zip(PROMPTS, outs) for tok, entry in zip(p[1:], o.prompt_logprobs[1:])]
    return [o.outputs[0].token_ids for o in outs], lps


def worker_pids(parent: int) -> list[int]:
    """PIDs of the live tensor-parallel workers of `parent`: its child processes that were
    spawned (`spawn_main`) or forked (the parent's own command line)."""
    parent_cmdline = Path(f"/proc/{parent}/cmdline").read_bytes()
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        worker = b"spawn_main" in cmdline or cmdline == parent_cmdline
        if int(fields[1]) == parent and fields[0] != "Z" and worker:
            pids.append(int(stat.parent.name))
    return pids


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_tied_dir"])
def test_tp2_greedy_and_prompt_logprobs_match_tp1(fixture, request):
    model_dir = str(request.getfixturevalue(fixture))
    tokens, lps = _generate(LLM(model_dir, max_model_len=128))
    with LLM(model_dir, max_model_len=128, tensor_parallel_size=2) as llm:
        assert llm.llm_engine.check_health() is None
        assert len(worker_pids(os.getpid())) == 1
        tp_tokens, tp_lps = _generate(llm)
    assert tp_tokens == tokens
    assert max(abs(a - b) for a, b in zip(tp_lps, lps)) < 1e-4          # float: summation order only
    deadline = time.monotonic() + 10
    while worker_pids(os.getpid()) and time.monotonic() < deadline:   # shutdown stopped the worker
        time.sleep(0.1)
    assert worker_pids(os.getpid()) == []


@pytest.mark.slow
def test_killed_worker_is_a_clear_error_not_a_hang(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), max_model_len=128, tensor_parallel_size=2)
    try:
        _generate(llm)
        (pid,) = worker_pids(os.getpid())
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        assert "tensor-parallel worker rank 1 exited with code -9" in llm.llm_engine.check_health()
        started = time.monotonic()
        with pytest.raises(WorkerDiedError, match="rank 1 exited with code -9"):
            _generate(llm)
        assert time.monotonic() - started < 10
    finally:
        llm.shutdown()


@pytest.mark.slow
def test_worker_startup_failure_names_the_rank(tiny_llama_dir, tmp_path):
    for path in tiny_llama_dir.iterdir():
        if path.is_file() and not path.name.endswith(".safetensors"):
            (tmp_path / path.name).write_bytes(path.read_bytes())
    tensors = load_file(str(tiny_llama_dir / "model.safetensors"))
    tensors["model.layers.1.mlp.down_proj.weight"] = tensors["model.layers.1.mlp.down_proj.weight"][:, :10].contiguous()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(RuntimeError, match=r"worker rank 1 exited with code 1: start-up: ValueError: "
                                           r"model.layers.1.mlp.down_proj"):
        LLM(str(tmp_path), max_model_len=128, tensor_parallel_size=2)


def test_non_divisible_head_counts_are_a_clear_value_error(tiny_llama_dir):
    with pytest.raises(ValueError, match=r"tensor_parallel_size: 3 does not divide the model's "
                                         r"num_attention_heads \(4\); sizes that do: \[1, 2, 4\]"):
        LLM(str(tiny_llama_dir), max_model_len=128, tensor_parallel_size=3)


def test_smollm2_needs_tp_3_not_2():
    config = load_hf_config(Path(_smollm2_dir()))
    with pytest.raises(ValueError, match=r"num_attention_heads \(9\); sizes that do: \[1, 3\]"):
        validate_tp_config(config, 2)
    validate_tp_config(config, 3)


def _smollm2_dir() -> str:
    from ascend_llm.loader import resolve_model_path
    return str(resolve_model_path("smollm2-135m-instruct"))


@pytest.mark.slow
def test_torchrun_style_env_launch(tiny_llama_dir, tmp_path):
    """Two processes launched from outside (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT)."""
    script = tmp_path / "launch.py"
    script.write_text(
        "import json, sys\n"
        "from ascend_llm import LLM, SamplingParams\n"
        f"llm = LLM({str(tiny_llama_dir)!r}, max_model_len=128, tensor_parallel_size=2)\n"
        "outs = llm.generate(prompt_token_ids=[[5, 17, 33, 101]], use_tqdm=False,\n"
        "                    sampling_params=SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))\n"
        "print('TOKENS', json.dumps(outs[0].outputs[0].token_ids))\n"
        "llm.shutdown()\n")
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outputs = [p.communicate(timeout=180)[0].decode(errors="replace") for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    line = next(x for x in outputs[0].splitlines() if x.startswith("TOKENS"))
    want = LLM(str(tiny_llama_dir), max_model_len=128).generate(
        prompt_token_ids=[[5, 17, 33, 101]], use_tqdm=False,
        sampling_params=SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    assert json.loads(line.split(" ", 1)[1]) == want[0].outputs[0].token_ids
    assert "TOKENS" not in outputs[1]                 # rank 1 only ran the worker loop


@pytest.mark.slow
def test_an_idle_driver_does_not_time_its_workers_out():
    """Workers wait for the next step on the control group, which has no practical timeout:
    a 2 s model-group timeout and 5 s of driver idleness still deliver the step."""
    from tests.distributed.tp_harness import spawn_idle_driver
    assert spawn_idle_driver(5.0) == "received"
