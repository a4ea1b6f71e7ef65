"""Online Hadamard before mlp.down_proj (calib/rotation.py, issue 28): the float model is
unchanged by smoothing + rotation, the checkpoint's description lists the rotated layers under
`online_hadamard`, and bad requests fail naming the problem. The quality target on SmolLM2 is in
test_smollm2_quality.py; the runtime side in tests/ops and tests/quant."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from calib.config import CalibConfig, CalibError
from calib.pipeline import run_calibration
from ascend_llm.numerics.hadamard import hadamard_matrix, rotate_input_blocks
from calib.rotation import apply_down_proj_rotation, auto_block_size, block_hadamard
from tests.shared_data import CALIB_PROSE
from tests.calib.test_cli import base_args, run_cli
from tests.tiny_models import make_tiny_model_dir, make_tokenizer, tiny_config, tiny_moe_config


def test_block_hadamard_acts_blockwise() -> None:
    x = torch.randn(3, 5, 96, dtype=torch.float64)
    y = block_hadamard(x, 32)
    h = hadamard_matrix(32).double()
    assert torch.allclose(y[..., 32:64], x[..., 32:64] @ h)
    assert torch.allclose(block_hadamard(y, 32), x)                   # H H = I
    w = torch.randn(7, 96, dtype=torch.float64)                       # the runtime's weight fold
    assert torch.allclose(block_hadamard(w, 32), rotate_input_blocks(w, 32))


def test_auto_block_size() -> None:
    assert auto_block_size(1536, "x") == 512
    assert auto_block_size(96, "x") == 32
    assert auto_block_size(11008, "x") == 256
    with pytest.raises(CalibError, match="input size 1000 has no power-of-two factor >= 16"):
        auto_block_size(1000, "model.layers.0.mlp.down_proj")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_rotation_keeps_the_float_model(tmp_path, arch) -> None:
    model_dir = make_tiny_model_dir(tmp_path / "m", arch)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.randint(3, 200, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        # make a massive activation in one down_proj input channel so smoothing has work to do
        model.model.layers[0].mlp.up_proj.weight[7] *= 40.0
        model.model.layers[0].mlp.down_proj.weight[:, 7] /= 40.0
        report = apply_down_proj_rotation(model, [ids[:, :16], ids[:, 8:]], block_size=32)
        after = model(ids).logits
    assert torch.allclose(before, after, atol=2e-4), (before - after).abs().max()
    assert report.layers == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert report.description() == {"block_size": 32, "layers": report.layers}
    entry = report.entries[0]
    assert entry.alpha > 0.0 and entry.absmax_after < entry.absmax_before
    assert entry.error_rotated < entry.error_plain
    assert model.model.layers[1].mlp.down_proj.online_hadamard_block == 32
    with pytest.raises(CalibError, match="already rotated"):
        apply_down_proj_rotation(model, [ids], block_size=32)


def test_rotation_block_must_divide_intermediate(tmp_path) -> None:
    config, cls = tiny_config("llama")
    model = cls(config).eval()
    with pytest.raises(CalibError, match="--hadamard_block_size 64: must be a power of two >= 16 dividing "
                                         "mlp.down_proj's input size 96"):
        apply_down_proj_rotation(model, [torch.ones(1, 4, dtype=torch.long)], block_size=64)


@pytest.mark.parametrize("bad, match", [
    (dict(rotation="quarot"), "--rotation: unknown rotation 'quarot'"),
    (dict(rotation="hadamard", a_bit=16), "implemented for int8 activations"),
    (dict(hadamard_block_size=64), "pass --rotation hadamard"),
    (dict(rotation="hadamard", hadamard_block_size=-1), "--hadamard_block_size"),
    (dict(dynamic_names=["*.mlp.down_proj"], is_dynamic=True), "--dynamic_names"),
])
def test_bad_rotation_options(bad, match) -> None:
    with pytest.raises(CalibError, match=match):
        CalibConfig(model_path="m", save_directory="o", calib_file="c", **bad).validate()


def test_checkpoint_lists_rotated_layers_and_dynamic_down_proj(tmp_path) -> None:
    model_dir = make_tiny_model_dir(tmp_path / "m", "llama")
    out = tmp_path / "out"
    report = run_calibration(CalibConfig(
        model_path=str(model_dir), save_directory=str(out), calib_file=str(CALIB_PROSE), num_samples=4,
        max_tokens=32, anti_method="m1", rotation="hadamard", dynamic_names=["*.mlp.down_proj"],
        progress=False))
    description = json.loads((out / "quant_model_description.json").read_text())
    layers = [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert description["online_hadamard"] == {"block_size": 32, "layers": layers}
    assert description["model.layers.0.mlp.down_proj.weight"] == "W8A8_DYNAMIC"
    assert description["model.layers.0.mlp.up_proj.weight"] == "W8A8"
    saved = json.loads((out / "calib_report.json").read_text())
    assert [e["name"] for e in saved["rotation"]["layers"]] == layers
    assert "rotation: hadamard(32) online before 2 down_proj layers" in report.format_table()
    smoothed = {g["name"]: g for g in saved["anti_outlier"]["groups"]}
    assert smoothed["model.layers.0.mlp.down_proj"]["reason"].startswith("left to the down_proj rotation")


def test_dynamic_names_must_cover_fused_groups(tmp_path) -> None:
    model_dir = make_tiny_model_dir(tmp_path / "m", "llama")
    with pytest.raises(CalibError, match="model.layers.0.mlp.gate_proj is fused with model.layers.0.mlp.up_proj"):
        run_calibration(CalibConfig(model_path=str(model_dir), save_directory=str(tmp_path / "o"),
                                    calib_file=str(CALIB_PROSE), num_samples=2, max_tokens=16, progress=False,
                                    dynamic_names=["model.layers.0.mlp.gate_proj"]))


# --- issue 28 "Bad input": the CLI exits 2 naming what cannot be rotated and why -------------------

def test_cli_rotation_of_a_moe_architecture_names_it_and_why(tmp_path, capsys) -> None:
    config, _ = tiny_moe_config("qwen2_moe")
    config.architectures = ["Qwen2MoeForCausalLM"]
    config.save_pretrained(tmp_path / "moe")                 # the architecture check reads config.json only
    code, _, err = run_cli(capsys, *base_args(tmp_path / "moe", tmp_path / "out"), "--rotation", "hadamard")
    assert code == 2 and "Traceback" not in err
    assert ("config.json: --rotation hadamard: cannot rotate architecture ['Qwen2MoeForCausalLM']: its MLPs are "
            "mixtures of experts (num_experts=8)") in err
    assert "the rotation is implemented for LlamaForCausalLM, Qwen2ForCausalLM" in err


def test_cli_rotation_of_an_input_size_without_a_hadamard_block_names_it(tmp_path, capsys) -> None:
    config, cls = tiny_config("llama")
    config.intermediate_size = 40                            # 8 x 5: no power-of-two factor >= 16
    cls(config).save_pretrained(tmp_path / "m", safe_serialization=True)
    make_tokenizer().save_pretrained(tmp_path / "m")
    code, _, err = run_cli(capsys, *base_args(tmp_path / "m", tmp_path / "out"), "--rotation", "hadamard")
    assert code == 2 and "Traceback" not in err
    assert ("--rotation hadamard: cannot rotate mlp.down_proj: its input size 40 has no power-of-two factor "
            ">= 16") in err
