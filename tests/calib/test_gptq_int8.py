"""GPTQ-rounded int8 weights in W8A8 / W8A8_DYNAMIC calibration (calib/gptq_int8.py, issue 28
target 3): the checkpoint holds exactly GPTQ's codes on min-max scales, their output error on the
calibration Hessian is below nearest rounding's, and the runtime serves the result."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ascend_llm import LLM, SamplingParams
from calib.config import CalibConfig
from calib.pipeline import run_calibration
from tests.shared_data import CALIB_PROSE
from tests.tiny_models import make_tiny_model_dir


@pytest.mark.parametrize("dynamic", [False, True])
def test_gptq_int8_codes_are_written_and_beat_nearest(tmp_path, dynamic) -> None:
    model_dir = make_tiny_model_dir(tmp_path / "m", "llama")
    out = tmp_path / "out"
    report = run_calibration(CalibConfig(
        model_path=str(model_dir), save_directory=str(out), calib_file=str(CALIB_PROSE), num_samples=4,
        max_tokens=48, w_method="GPTQ", is_dynamic=dynamic, progress=False))
    summary = report.gptq
    assert len(summary["layers"]) == 14                          # 7 Linears x 2 layers
    assert summary["mean_output_error_gptq"] < summary["mean_output_error_rtn"]
    assert all(g <= r * 1.0001 for r, g in summary["layers"].values())
    tensors = load_file(str(out / "quant_model_weights.safetensors")) if (out / "quant_model_weights.safetensors").exists() \
        else {k: v for f in out.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    q = tensors["model.layers.1.mlp.down_proj.weight"]
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
    saved = json.loads((out / "calib_report.json").read_text())
    assert saved["gptq"]["damp_used"] > 0
    llm = LLM(str(out), max_model_len=128, enforce_eager=True)
    text = llm.generate(["hello world"], SamplingParams(max_tokens=4, temperature=0.0))[0].outputs[0].text
    assert isinstance(text, str)
