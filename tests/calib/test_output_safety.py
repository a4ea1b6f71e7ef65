"""Output-directory safety (refuse non-empty, --overwrite, nothing half-written) and NaN / inf
reporting with the layer name."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from calib.cli import main
from calib.config import CalibConfig, CalibError
from calib.pipeline import run_calibration
from tests.shared_data import CALIB_PROSE


def config(model_dir: Path, out: Path, **overrides) -> CalibConfig:
    return CalibConfig(model_path=str(model_dir), save_directory=str(out), calib_file=str(CALIB_PROSE),
                       num_samples=2, max_tokens=32, progress=False, **overrides)


def siblings(out: Path) -> list[str]:
    """Everything beside `out` in its parent (staging leftovers would show up here)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


def copy_model_with(model_dir: Path, dest: Path, name: str, edit) -> Path:
    """A copy of the tiny model whose tensor `name` went through `edit` (in place)."""
    shutil.copytree(model_dir, dest)
    weights = load_file(str(dest / "model.safetensors"))
    edit(weights[name])
    save_file(weights, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def test_non_empty_directory_is_refused_without_overwrite(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = main(["--model_path", str(tiny_llama_dir), "--save_directory", str(out), "--calib_file",
                 str(CALIB_PROSE), "--num_samples", "2", "--max_tokens", "32", "--no_progress"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"--save_directory: '{out}' exists and is not empty" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_a_file_as_output_directory_is_refused(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    out.write_text("x")
    with pytest.raises(CalibError, match="exists and is not a directory"):
        run_calibration(config(tiny_llama_dir, out))


def test_empty_directory_is_used_and_overwrite_replaces_content(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    run_calibration(config(tiny_llama_dir, out))                       # empty: allowed
    first = (out / "quant_model_weights.safetensors").read_bytes()
    (out / "stale.txt").write_text("old run")
    code = main(["--model_path", str(tiny_llama_dir), "--save_directory", str(out), "--calib_file",
                 str(CALIB_PROSE), "--num_samples", "2", "--max_tokens", "32", "--no_progress",
                 "--quiet", "--overwrite", "--is_dynamic"])
    assert code == 0, capsys.readouterr().err
    assert not (out / "stale.txt").exists()                             # replaced, not merged
    assert (out / "quant_model_weights.safetensors").read_bytes() != first
    assert '"model_quant_type": "W8A8_DYNAMIC"' in (out / "quant_model_description.json").read_text()
    assert siblings(out) == []                                         # no staging / old copies left


def _failing_writer(*args, **kwargs):
    from calib.export import write_checkpoint

    write_checkpoint(*args, **kwargs)              # the weights land in the staging directory ...
    raise OSError("disk full (injected)")          # ... then the export fails


def test_failure_mid_export_leaves_nothing(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("calib.pipeline.write_checkpoint", _failing_writer)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="injected"):
        run_calibration(config(tiny_llama_dir, out))
    assert not out.exists() and siblings(out) == []


def test_failure_mid_export_keeps_the_old_content(tiny_llama_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run_calibration(config(tiny_llama_dir, out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr("calib.pipeline.write_checkpoint", _failing_writer)
    with pytest.raises(OSError, match="injected"):
        run_calibration(config(tiny_llama_dir, out, overwrite=True, is_dynamic=True))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert siblings(out) == []


def test_nan_weight_is_reported_with_its_name(tiny_llama_dir, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    model = copy_model_with(tiny_llama_dir, tmp_path / "nan_model", name,
                            lambda t: t.view(-1)[3:5].fill_(float("nan")))
    with pytest.raises(CalibError, match=rf"weight '{name}' in the checkpoint holds non-finite values \(2 NaN, 0 inf"):
        run_calibration(config(model, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_inf_weight_is_reported_through_the_cli(tiny_qwen2_dir, tmp_path, capsys):
    name = "model.layers.0.self_attn.k_proj.bias"
    model = copy_model_with(tiny_qwen2_dir, tmp_path / "inf_model", name, lambda t: t[0:1].fill_(float("inf")))
    code = main(["--model_path", str(model), "--save_directory", str(tmp_path / "out"), "--calib_file",
                 str(CALIB_PROSE), "--num_samples", "2", "--max_tokens", "32", "--no_progress"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"weight '{name}' in the checkpoint holds non-finite values (0 NaN, 1 inf" in err


def test_overflowing_activation_is_reported_with_the_layer(tiny_llama_dir, tmp_path):
    # finite but huge layer-0 down_proj weights: its output overflows to inf in the residual, and
    # layer 1's RMSNorm turns inf * rsqrt(inf) into NaN at the input of layer 1's q/k/v
    model = copy_model_with(tiny_llama_dir, tmp_path / "huge_model", "model.layers.0.mlp.down_proj.weight",
                            lambda t: t.fill_(3e38))
    with pytest.raises(CalibError, match=r"activation at the input of 'model.layers.1.self_attn.q_proj' "
                                         r"holds non-finite values"):
        run_calibration(config(model, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_activation_check_passes_finite_and_names_layer():
    from calib.finite import check_finite_activation

    x = torch.randn(8, 16)                                              # [T, k]
    check_finite_activation(x, "model.layers.3.mlp.down_proj")          # no error
    x[2, 5] = float("-inf")
    with pytest.raises(CalibError, match=r"'model.layers.3.mlp.down_proj' holds non-finite values "
                                         r"\(0 NaN, 1 inf of 128\)"):
        check_finite_activation(x, "model.layers.3.mlp.down_proj")
