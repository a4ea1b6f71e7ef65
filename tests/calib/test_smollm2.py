"""Real SmolLM2-135M-Instruct: W8A8 static calibration on real prose, perplexity vs float.

Measured 2026-11-23 (first 1024 tokens of eval_tempest.txt, window 1024; 16 x 128 calibration
tokens from calib_prose.jsonl unless noted), float 27.77:
  W8A8 static, min-max (act_method 1)                         57.3
  W8A8 static, histogram (act_method 2)                       43.8
  W8A8 static, auto (act_method 3)                            46.5
  W8A8 static, min-max, disable_level L4                      34.1   <- this test
  W8A8 static, auto, disable_level L4                         31.7
  W8A8 static, min-max, anti_method m1                        32.5
  W8A8 static, min-max, anti_method m2                        32.6
  W8A8 static, min-max, anti_method m2, disable_level L4      29.4
  W8A8_DYNAMIC                                                29.0
  MoFQ mixed (112 W8A8_DYNAMIC + 98 WFP8AFP8_DYNAMIC)         28.8
  W8A16                                                       27.9
The four Linears L4 keeps in float are mlp.down_proj of layers 1, 2, 11 and 28 (massive
activations).
"""
from __future__ import annotations

import pytest
import torch

from ascend_llm import LLM
from ascend_llm.eval.perplexity import perplexity
from ascend_llm.loader.resolve import resolve_model_path
from calib.config import CalibConfig
from calib.pipeline import run_calibration
from tests.shared_data import CALIB_PROSE, EVAL_TEMPEST

FLOAT_PPL = 27.77


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for this heavy test: on a shared, oversubscribed 2-core machine two
    spinning OpenMP threads made it ~10x slower (170 s vs 15 s); results are unaffected."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_smollm2_w8a8_static_perplexity_close_to_float(tmp_path, one_torch_thread):
    try:
        resolve_model_path("smollm2-135m-instruct")
    except ValueError as exc:                         # the bundled GGUF is part of the repo setup
        pytest.fail(f"SmolLM2 is not available: {exc}")
    out = tmp_path / "smollm2_w8a8"
    report = run_calibration(CalibConfig(
        model_path="smollm2-135m-instruct", save_directory=str(out),
        calib_file=str(CALIB_PROSE), num_samples=16, max_tokens=128,
        act_method=1, disable_level="L4", progress=False))
    assert report.model_quant_type == "W8A8"
    level = [n for n, why in report.float_layers.items() if why.startswith("disable_level")]
    assert len(level) == 4
    llm = LLM(str(out), max_model_len=1100, enforce_eager=True)
    ids = llm.get_tokenizer()(EVAL_TEMPEST.read_text())["input_ids"][:1024]
    ppl = perplexity(llm, ids, 1024).perplexity
    # measured 34.1; the bound leaves room for numeric differences across machines
    assert FLOAT_PPL < ppl < 1.4 * FLOAT_PPL
