"""Real SmolLM2-135M-Instruct: `python -m calib` records the accuracy reference, and `verify` on
CPU replays the same numbers (W8A8_DYNAMIC, 8 x 128 calibration tokens)."""
from __future__ import annotations

import pytest

from ascend_llm import LLM
from ascend_llm.eval.accuracy_guard import verify
from ascend_llm.eval.accuracy_reference import load_reference
from calib.config import CalibConfig
from calib.pipeline import run_calibration
from tests.calib.test_smollm2 import one_torch_thread  # noqa: F401  (fixture)
from tests.shared_data import CALIB_PROSE


@pytest.mark.slow
def test_smollm2_recorded_and_replayed_numbers_agree(tmp_path, one_torch_thread):  # noqa: F811
    out = tmp_path / "smollm2_w8a8_dynamic"
    run_calibration(CalibConfig(model_path="smollm2-135m-instruct", save_directory=str(out),
                                calib_file=str(CALIB_PROSE), num_samples=8, max_tokens=128,
                                is_dynamic=True, progress=False))
    reference = load_reference(out)
    assert [p.source for p in reference.prompts].count("calibration-heldout") == 4
    with LLM(str(out), enforce_eager=True, device="cpu", kv_cache_memory_gb=0.1) as llm:
        report = verify(llm.llm_engine, reference)
    print(report.text())
    assert report.ok, report.text()
    for key in ("mean_kl", "top1_agreement", "ppl_ratio"):
        assert getattr(report.scores, key) == pytest.approx(reference.at_conversion[key], rel=1e-3, abs=1e-4)
