"""Issue 28 "Bad input": GPTQ on layers whose input Hessian is singular, through the CLI, on both
GPTQ paths (int8 W8A8: calib/gptq_int8.py; int4 weight-only: calib/weight_only.py).

The tiny Llama gets input channels that are always zero (a zeroed RMSNorm weight feeds gate/up,
a zeroed up_proj row feeds down_proj), calibration has fewer tokens than most layers' input dim
(a rank-deficient H everywhere), and one group's Hessian is replaced by an indefinite matrix whose
damped Cholesky fails until the dampening is raised to 10. The run succeeds, every written tensor
is finite, and calib_report.json names the raised dampening and (int8) the dead channels."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from calib import gptq_int8, weight_only
from tests.calib.test_cli import run_cli
from tests.shared_data import CALIB_PROSE
from tests.tiny_models import make_tiny_model_dir

INDEFINITE = "model.layers.0.self_attn.o_proj"        # its group key and its only Linear


@pytest.fixture(scope="module")
def dead_channel_model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("singular")
    src = make_tiny_model_dir(root / "src", "llama")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight[5] = 0.0    # gate/up input channel 5 is 0
        model.model.layers[1].mlp.up_proj.weight[7] = 0.0                  # down_proj input channel 7 is 0
    model.save_pretrained(root / "dead")
    for path in src.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens")):
            (root / "dead" / path.name).write_bytes(path.read_bytes())
    return root / "dead"


def _with_indefinite_hessian(monkeypatch, module) -> None:
    real = module.decoder_hessians

    def hessians(*args, **kwargs):
        found = real(*args, **kwargs)
        k = found[INDEFINITE].shape[0]       # eigenvalues 2k - 1 and -1: Cholesky fails below dampening 1
        found[INDEFINITE] = torch.ones(k, k, dtype=torch.float64) * 2 - torch.eye(k, dtype=torch.float64)
        return found
    monkeypatch.setattr(module, "decoder_hessians", hessians)
    if hasattr(module, "hessian_hook"):          # weight_only's layer-sequential GPTQ (calib/sequential.py)
        real_hook = module.hessian_hook

        def hook(group, store, token_cap):
            record = real_hook(group, store, token_cap)

            def replaced(*args):
                record(*args)
                if group.key == INDEFINITE:
                    k = store[INDEFINITE].shape[0]
                    store[INDEFINITE] = torch.ones(k, k, dtype=torch.float64) * 2 - torch.eye(k, dtype=torch.float64)
            return replaced
        monkeypatch.setattr(module, "hessian_hook", hook)


def _calibrate(capsys, model_dir: Path, out: Path, *flags: str) -> dict:
    code, _, err = run_cli(capsys, "--model_path", str(model_dir), "--save_directory", str(out), "--calib_file",
                           str(CALIB_PROSE), "--num_samples", "1", "--max_tokens", "16", "--no_progress",
                           "--w_method", "GPTQ", *flags)
    assert code == 0, err
    tensors = {k: v for f in out.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    assert all(bool(torch.isfinite(v.float()).all()) for v in tensors.values())
    return json.loads((out / "calib_report.json").read_text())


def test_int8_gptq_on_singular_hessians_reports_dampening_and_dead_channels(dead_channel_model, tmp_path,
                                                                            capsys, monkeypatch):
    _with_indefinite_hessian(monkeypatch, gptq_int8)
    summary = _calibrate(capsys, dead_channel_model, tmp_path / "int8")["gptq"]
    assert summary["raised_damp"] == [INDEFINITE] and summary["layer_damp"][INDEFINITE] == 10.0
    assert summary["damp_used"] == 10.0
    assert all(d == weight_only.GPTQ_DAMP for n, d in summary["layer_damp"].items() if n != INDEFINITE)
    assert summary["dead_input_channels"] == {"model.layers.0.mlp.gate_proj": 1, "model.layers.0.mlp.up_proj": 1,
                                              "model.layers.1.mlp.down_proj": 1}
    assert all(g == g and r == r for r, g in summary["layers"].values())             # no NaN errors


def test_int4_weight_only_gptq_on_singular_hessians_reports_dampening(dead_channel_model, tmp_path, capsys,
                                                                      monkeypatch):
    _with_indefinite_hessian(monkeypatch, weight_only)
    summary = _calibrate(capsys, dead_channel_model, tmp_path / "int4", "--w_bit", "4", "--a_bit", "16",
                         "--group_size", "32")["weight_only"]
    assert summary["raised_damp"] == [INDEFINITE] and summary["layers"][INDEFINITE]["damp"] == 10.0
    assert summary["damp_used"] == [weight_only.GPTQ_DAMP, 10.0]
    assert all(v["written"] == v["written"] for v in summary["layers"].values())     # no NaN errors
