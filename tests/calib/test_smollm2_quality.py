"""Real SmolLM2-135M-Instruct quality targets of the calibrator (issue 4), measured end to end:
calibrate -> write the ascendV1 checkpoint -> serve it with the runtime -> perplexity on
eval_tempest.txt against the float model served the same way.

- every Linear static W8A8 (`w8a8_static_rot`: m3, and smoothing + online Hadamard before
  down_proj; issue 28 target 1) within 1.05x of float on both eval texts, and with the down_proj
  W8A8_DYNAMIC (`w8a8_static_dynamic_down`, target 2) within 1.02x;
- every anti-outlier method beats no smoothing at the same act_method / disable_level (small
  calibration set and 1024 evaluation tokens, one calibration per method).
Numbers of the full grid: benchmarks/bench_calib.py -> benchmarks/results/calib_grid_smollm2_*.json (both texts;
calib_smollm2_2026-11-23.json: the Tempest only)
(measured 2026-11-23: float 39.96, w8a8_best 40.36 = 1.010x, no smoothing 76.57 = 1.92x). The
16k-token evaluations dominate the run time.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ascend_llm import LLM
from ascend_llm.eval.perplexity import perplexity
from ascend_llm.loader.resolve import resolve_model_path
from calib.config import build_config
from calib.pipeline import run_calibration
from calib.report import CalibReport
from tests.shared_data import CALIB_PROSE, EVAL_PARADISE, EVAL_TEMPEST

WINDOW = 512


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread: on the shared, oversubscribed 2-core machine two spinning OpenMP
    threads are many times slower; results are unaffected."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    try:
        return Path(resolve_model_path("smollm2-135m-instruct"))
    except ValueError as exc:                         # the bundled GGUF is part of the repo setup
        pytest.fail(f"SmolLM2 is not available: {exc}")


def eval_ids(model_dir: Path, num_tokens: int, text: Path = EVAL_TEMPEST) -> list[int]:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir)(text.read_text())["input_ids"][:num_tokens]
    assert len(ids) == num_tokens
    return ids


def served_perplexity(model_dir: Path | str, ids: list[int]) -> float:
    llm = LLM(str(model_dir), max_model_len=WINDOW + 64, enforce_eager=True)
    return perplexity(llm, ids, WINDOW).perplexity


def calibrate(out: Path, **options) -> CalibReport:
    values = {"model_path": "smollm2-135m-instruct", "save_directory": str(out),
              "calib_file": str(CALIB_PROSE), "progress": False, **options}
    report = run_calibration(build_config(values))
    assert report.model_quant_type == "W8A8"
    return report


@pytest.fixture(scope="module")
def float_ppl_4k(smollm2_dir, one_torch_thread) -> dict[str, tuple[list[int], float]]:
    """text name -> (its first 4096 token ids, the float model's perplexity on them)."""
    out = {}
    for text in (EVAL_TEMPEST, EVAL_PARADISE):
        ids = eval_ids(smollm2_dir, 4096, text)
        out[text.name] = (ids, served_perplexity(smollm2_dir, ids))
    return out


# Issue 28 targets 1 and 2 on the real model, scaled down for the suite: 16 x 128 calibration tokens
# (the recipes: 64 x 512) and the first 4096 tokens of each eval text (the benchmark: 16384;
# benchmarks/results/calib_w8a8_targets_smollm2_*.json). Measured here (2026-12-07, EPYC): T1
# 1.012x / 1.007x; T2 1.005x / 1.008x.
@pytest.mark.slow
@pytest.mark.parametrize("recipe, bound, dynamic", [("w8a8_static_rot", 1.05, 0),
                                                    ("w8a8_static_dynamic_down", 1.02, 30)])
def test_every_linear_int8_within_the_target_on_both_texts(recipe, bound, dynamic, tmp_path, float_ppl_4k):
    """T1: all 210 Linears static W8A8 (m3, smoothing + online Hadamard before down_proj) <= 1.05x;
    T2: the same with the 30 down_proj W8A8_DYNAMIC <= 1.02x. No Linear stays float."""
    out = tmp_path / recipe
    report = run_calibration(build_config({"model_path": "smollm2-135m-instruct", "save_directory": str(out),
                                           "calib_file": str(CALIB_PROSE), "progress": False, "recipe": recipe,
                                           "num_samples": 16, "max_tokens": 128}))
    assert len(report.layers) == 210 and report.float_layers == {}
    types = [r.quant_type for r in report.layers]
    assert types.count("W8A8_DYNAMIC") == dynamic and types.count("W8A8") == 210 - dynamic
    description = json.loads((out / "quant_model_description.json").read_text())
    down_projs = [f"model.layers.{i}.mlp.down_proj" for i in range(30)]
    assert description["online_hadamard"] == {"block_size": 512, "layers": down_projs}
    for name, (ids, float_ppl) in float_ppl_4k.items():
        ppl = served_perplexity(out, ids)
        assert ppl < bound * float_ppl, (recipe, name, ppl, float_ppl)


@pytest.fixture(scope="module")
def unsmoothed_ppl(tmp_path_factory, smollm2_dir, one_torch_thread) -> float:
    out = tmp_path_factory.mktemp("none") / "ckpt"
    calibrate(out, num_samples=4, max_tokens=128, act_method=1)
    return served_perplexity(out, eval_ids(smollm2_dir, 1024))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["m1", "m2", "m3", "m4", "m6"])
def test_every_anti_outlier_method_beats_no_smoothing(method, tmp_path, smollm2_dir, unsmoothed_ppl):
    out = tmp_path / method
    calibrate(out, num_samples=4, max_tokens=128, act_method=1, anti_method=method)
    ppl = served_perplexity(out, eval_ids(smollm2_dir, 1024))
    assert ppl < unsmoothed_ppl, (method, ppl, unsmoothed_ppl)
