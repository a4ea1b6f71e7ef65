"""disable_level Lk keeps the k most sensitive Linears in float; --disable_names forces others."""
from __future__ import annotations

import json

import pytest
import torch

from ascend_llm import LLM
from calib.config import CalibConfig, CalibError
from calib.model_spec import LinearGroup
from calib.pipeline import run_calibration
from calib.sensitivity import score_layers, select_float_layers
from tests.shared_data import CALIB_PROSE

CALIB_FILE = str(CALIB_PROSE)
GROUPS = [LinearGroup("l0.qkv", ("l0.q", "l0.k", "l0.v"), 0), LinearGroup("l0.o", ("l0.o",), 0),
          LinearGroup("l0.gu", ("l0.gate", "l0.up"), 0), LinearGroup("l0.down", ("l0.down",), 0)]


def test_top_k_scores_stay_float_with_their_fused_siblings():
    scores = {"l0.q": 0.1, "l0.k": 0.5, "l0.v": 0.2, "l0.o": 0.05, "l0.gate": 0.3, "l0.up": 0.01,
              "l0.down": 0.4}
    reasons = select_float_layers(scores, 2, [], GROUPS)
    assert reasons["l0.k"].startswith("disable_level L2: sensitivity rank 1/7")
    assert reasons["l0.down"].startswith("disable_level L2: sensitivity rank 2/7")
    assert set(reasons) == {"l0.k", "l0.down", "l0.q", "l0.v"}      # q, v: fused with k
    assert reasons["l0.q"].startswith("fused with l0.k")
    assert select_float_layers(scores, 0, [], GROUPS) == {}


def test_disable_names_are_forced_and_checked():
    scores = {"l0.q": 0.1, "l0.k": 0.1, "l0.v": 0.1, "l0.o": 0.05, "l0.gate": 0.3, "l0.up": 0.01,
              "l0.down": 0.4}
    reasons = select_float_layers(scores, 1, ["l0.o"], GROUPS)
    assert reasons == {"l0.o": "--disable_names",
                       "l0.down": "disable_level L1: sensitivity rank 1/6, output error 4.000e-01"}
    with pytest.raises(CalibError, match="'l0.nope' matches no decoder Linear"):
        select_float_layers(scores, 0, ["l0.nope"], GROUPS)


def test_disable_names_glob_patterns_expand_to_every_match():
    scores = {"l0.q": 0.1, "l0.k": 0.1, "l0.v": 0.1, "l0.o": 0.05, "l0.gate": 0.3, "l0.up": 0.01,
              "l0.down": 0.4}
    reasons = select_float_layers(scores, 1, ["*.down", "l0.[o]"], GROUPS)
    assert reasons == {"l0.down": "--disable_names *.down", "l0.o": "--disable_names l0.[o]",
                       "l0.gate": "disable_level L1: sensitivity rank 1/5, output error 3.000e-01",
                       "l0.up": "fused with l0.gate (one type per fused runtime layer)"}
    with pytest.raises(CalibError, match=r"'\*.mlp.nothing' matches no decoder Linear"):
        select_float_layers(scores, 0, ["*.mlp.nothing"], GROUPS)


def test_score_is_the_output_error_of_quantizing_the_layer_alone():
    gen = torch.Generator().manual_seed(0)
    flat = torch.randn(16, 32, generator=gen)
    spiky = flat.clone()
    spiky[:, 3] *= 50                                      # one huge weight column: coarse int8 rows
    weights = {"a": flat, "b": spiky}
    group = LinearGroup("g", ("a", "b"), 0)
    x = torch.randn(64, 32, generator=gen)
    x[:, 3] *= 0.01                                        # ... that adds little to the output
    scores = score_layers([group], lambda n: (weights[n], None), {"g": x},
                          {"a": "W8A8_DYNAMIC", "b": "W8A8_DYNAMIC"}, {"g": None}, progress=False)
    assert scores["b"] > 5 * scores["a"] > 0


def test_disable_level_l2_on_a_tiny_llama(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    report = run_calibration(CalibConfig(
        model_path=str(tiny_llama_dir), save_directory=str(out), calib_file=CALIB_FILE, num_samples=3,
        max_tokens=48, progress=False, disable_level="L2",
        disable_names=["model.layers.1.self_attn.o_proj"]))
    records = {r.name: r for r in report.layers}
    ranked = sorted((r for r in records.values() if r.float_reason != "--disable_names"),
                    key=lambda r: r.sensitivity, reverse=True)
    top2 = {r.name for r in ranked[:2]}
    level = {n for n, r in records.items() if r.float_reason and r.float_reason.startswith("disable_level")}
    assert level == top2                                      # exactly 2, the highest scoring
    assert records["model.layers.1.self_attn.o_proj"].quant_type == "FLOAT"
    for name, record in records.items():
        if record.quant_type == "FLOAT" and name not in top2 and record.float_reason != "--disable_names":
            assert record.float_reason.startswith("fused with")
            assert record.float_reason.split()[2] in top2
    desc = json.loads((out / "quant_model_description.json").read_text())
    for name, record in records.items():
        assert desc[f"{name}.weight"] == record.quant_type
    saved = json.loads((out / "calib_report.json").read_text())
    assert set(saved["float_layers"]) == {n for n, r in records.items() if r.quant_type == "FLOAT"}
    llm = LLM(str(out), max_model_len=64, enforce_eager=True)
    layer = llm.llm_engine.model_runner.model.model.layers[1]
    assert layer.self_attn.o_proj.weight.dtype == torch.float32
