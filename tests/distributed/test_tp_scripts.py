"""`LLM(tensor_parallel_size=2)` from the programs users write, each run in its own
interpreter: a program piped to `python -` (a heredoc), a script without an
`if __name__ == "__main__":` guard, the first under a forced spawn, and a worker that dies
during start-up (the unguarded script under spawn: its worker re-runs the script and exits),
which must be reported at once, not after the 120 s rendezvous time-out."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 60          # a program that waits for the rendezvous time-out fails the test

# TP=1 first: the parent has run torch's OpenMP pool before it starts the worker
PROGRAM = """\
import json, logging
from ascend_llm import LLM, SamplingParams
logging.basicConfig(level=logging.INFO)     # the driver logs its start method and why
params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
prompts = [[5, 17, 33, 101], [300, 12, 9, 77, 150, 4, 4]]
def tokens(llm):
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]
tp1 = tokens(LLM(MODEL_DIR, max_model_len=128))
with LLM(MODEL_DIR, max_model_len=128, tensor_parallel_size=2) as llm:
    tp2 = tokens(llm)
print("TOKENS", json.dumps([tp1, tp2]))
"""
TP2_ONLY = """\
from ascend_llm import LLM
LLM(MODEL_DIR, max_model_len=128, tensor_parallel_size=2)
print("STARTED")
"""


def _program(template: str, model_dir: Path) -> str:
    return template.replace("MODEL_DIR", repr(str(model_dir)))


def _run(args: list[str], cwd: Path, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    environment = {k: v for k, v in os.environ.items() if not k.endswith("WORKER_MULTIPROC_METHOD")}
    environment.update(PYTHONPATH=str(ROOT), **env)
    started = time.monotonic()
    done = subprocess.run(args, cwd=cwd, env=environment, capture_output=True, text=True, timeout=TIMEOUT_S)
    return done, time.monotonic() - started


def _run_heredoc(program: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """`python - <<'EOF' ... EOF` in bash, as a user types it."""
    done, _ = _run(["bash", "-c", f"exec {sys.executable} - <<'EOF'\n{program}EOF\n"], cwd, **env)
    return done


def _assert_tp2_equals_tp1(done: subprocess.CompletedProcess, method: str) -> None:
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("TOKENS"))
    tp1, tp2 = json.loads(line.split(" ", 1)[1])
    assert tp2 == tp1 and len(tp1) == 2 and len(tp1[0]) == 8
    assert f"starting 1 worker process(es) with {method}" in done.stderr


def test_tp2_from_python_stdin(tiny_llama_dir, tmp_path):
    done = _run_heredoc(_program(PROGRAM, tiny_llama_dir), tmp_path)
    _assert_tp2_equals_tp1(done, "fork")


def test_tp2_from_a_script_without_main_guard(tiny_llama_dir, tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(_program(PROGRAM, tiny_llama_dir))
    done, _ = _run([sys.executable, str(script)], tmp_path)
    _assert_tp2_equals_tp1(done, "fork")


def test_tp2_from_python_stdin_under_forced_spawn(tiny_llama_dir, tmp_path):
    """Spawned workers cannot re-run `<stdin>`: they start without the main module."""
    done = _run_heredoc(_program(PROGRAM, tiny_llama_dir), tmp_path, VLLM_WORKER_MULTIPROC_METHOD="spawn")
    _assert_tp2_equals_tp1(done, "spawn")
    assert "'<stdin>' cannot be re-run, so the workers start without it" in done.stderr


def test_a_worker_dying_at_start_up_is_reported_at_once(tiny_llama_dir, tmp_path):
    """Under spawn the worker re-runs the unguarded script, which tries to start a process while
    bootstrapping: multiprocessing raises and the worker exits with code 1 before the rendezvous."""
    script = tmp_path / "unguarded_tp2.py"
    script.write_text(_program(TP2_ONLY, tiny_llama_dir))
    done, elapsed = _run([sys.executable, str(script)], tmp_path, VLLM_WORKER_MULTIPROC_METHOD="spawn")
    assert done.returncode == 1 and "STARTED" not in done.stdout
    assert elapsed < 45, done.stderr[-3000:]         # the rendezvous time-out is 120 s
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ascend_llm.executor.errors.WorkerDiedError: tensor-parallel start-up failed: "
                           "tensor-parallel worker rank 1 exited with code 1 before it ran the worker code"), last
    assert 'if __name__ == "__main__":' in last and "VLLM_WORKER_MULTIPROC_METHOD=fork" in last
    assert "finished its bootstrapping phase" in done.stderr        # the worker's own traceback
