"""Checkpoints for the accuracy-guard tests: a tiny W8A8 written by `python -m calib` (with its
accuracy_reference.json) and the same with one layer's scales multiplied by 4."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from ascend_llm.quant.w8a8 import decode_deq_scale, encode_deq_scale_int64
from calib.pipeline import run_calibration
from tests.calib.test_roundtrip import calib_config


@pytest.fixture(scope="session")
def good_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("guard") / "w8a8"
    run_calibration(calib_config(Path(tiny_llama_dir), out, "W8A8"))
    return out


@pytest.fixture(scope="session")
def damaged_dir(good_dir, tmp_path_factory) -> Path:
    """The good checkpoint with one layer's dequantization scales (W8A8 static: deq_scale =
    input_scale * weight_scale, int64-encoded fp32) multiplied by 4."""
    out = tmp_path_factory.mktemp("guard") / "damaged"
    shutil.copytree(good_dir, out)
    (weights,) = out.glob("quant_model_weight*.safetensors")
    tensors = load_file(weights)
    name = "model.layers.0.mlp.down_proj.deq_scale"
    tensors[name] = encode_deq_scale_int64(decode_deq_scale(tensors[name]) * 4)
    save_file(tensors, weights)
    return out
