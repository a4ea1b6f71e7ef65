"""WINT2 tuning with moving group nibbles (calib/wint2/tune_groups.py, `TuneSpec.group_lr`) on a tiny Llama."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ascend_llm.numerics import wint2 as L
from calib.wint2.calibration import CalibSpec
from calib.wint2.student import ScaledCodeLinear
from calib.wint2.tune import TuneSpec, tune_wint2_checkpoint
from calib.wint2.tune import main as tune_main
from calib.wint2.tune_groups import Wint2GroupScaleLinear
from tests.calib.wint2.test_wint2_tune import assert_engine_matches_student
from tests.calib.wint2.wint2_written import first_wint2, written  # noqa: F401 (fixture)
from tests.calib.wint2.word_text import word_text_file


def _nibbles(packed: torch.Tensor, k: int) -> torch.Tensor:
    """[G, n] nibble values of a packed WINT2 weight_scale."""
    return L.group_scales(packed, torch.ones(packed.shape[1]), k)


def _fixed(t: dict[str, torch.Tensor]) -> ScaledCodeLinear:
    ones = torch.ones_like(t["super_scales"], dtype=torch.float32)
    codes = L.dequantize_wint2(t["quant_weight"], t["weight_scale"], ones, t["code_scale"], t["code_zp"])
    return ScaledCodeLinear(codes, t["super_scales"], None)


def test_layer_starts_as_the_written_checkpoint_and_moves_one_nibble_when_pushed(written):
    _, t = first_wint2(written)
    layer, fixed = Wint2GroupScaleLinear(t, None), _fixed(t)
    k = fixed.codes.shape[1]
    x = torch.randn(3, k)
    torch.testing.assert_close(layer(x), fixed(x), rtol=1e-6, atol=1e-6)
    assert torch.equal(layer.weight_scale(), t["weight_scale"]) and layer.nibbles_changed() == 0
    layer(x).square().sum().backward()
    assert layer.group_delta.grad is not None and layer.group_delta.grad.abs().sum() > 0   # straight-through
    col, group = 5, 1
    old = int(layer.nibble_base[col, group])
    new = old - 3 if old > 3 else old + 3
    with torch.no_grad():
        layer.group_delta[col, group] = new / old - 1 + 0.1 / old          # lands within 0.1 of `new`
    assert layer.nibbles_changed() == 1
    expected = _nibbles(t["weight_scale"], k)
    expected[group, col] = new
    torch.testing.assert_close(_nibbles(layer.weight_scale(), k), expected)
    with torch.no_grad():                       # the fixed layer with that group's codes rescaled
        rows = slice(group * L.GROUP_SIZE, (group + 1) * L.GROUP_SIZE)
        fixed.codes[col, rows] *= new / old
        torch.testing.assert_close(layer(x), fixed(x), rtol=1e-6, atol=1e-5)


def test_latent_nibbles_are_clamped_to_four_bits(written):
    _, t = first_wint2(written)
    layer = Wint2GroupScaleLinear(t, None)
    with torch.no_grad():
        layer.group_delta.fill_(5.0)
    assert layer.nibbles().max() == L.NIBBLE_MAX
    with torch.no_grad():
        layer.group_delta.fill_(-2.0)
    assert layer.nibbles().min() == 0


@pytest.fixture(scope="module")
def tuned(written, tiny_llama_dir) -> tuple[Path, list[dict], list[dict]]:
    calib = word_text_file(written / "calib.jsonl", num_texts=12)
    args = ["--calib_num_samples", "16", "--calib_seq_len", "48", "--calib_holdout_samples", "2",
            "--epochs", "3", "--lr", "1e-2"]
    tune_main(["--model_path", str(tiny_llama_dir), "--quant_path", str(written / "plain"),
               "--save_directory", str(written / "groups"), "--calib_file", str(calib), *args,
               "--group_lr", "1e-2"])
    spec = CalibSpec(str(calib), num_samples=16, seq_len=48, holdout_samples=2)
    history = tune_wint2_checkpoint(tiny_llama_dir, written / "plain", written / "groups_api", spec,
                                    TuneSpec(epochs=3, lr=1e-2, group_lr=1e-2))
    scale_only = tune_wint2_checkpoint(tiny_llama_dir, written / "plain", written / "scales", spec,
                                       TuneSpec(epochs=3, lr=1e-2))
    return written, history, scale_only


def test_nibbles_move_and_nothing_else_discrete_changes(tuned):
    root, history, _ = tuned
    before = load_file(str(root / "plain" / "model.safetensors"))
    wint2 = [n.removesuffix(".quant_weight") for n in before if n.endswith(".quant_weight")]
    for out in ("groups", "groups_api"):                 # the CLI and the API write the same file
        after = load_file(str(root / out / "model.safetensors"))
        assert before.keys() == after.keys()
        assert all(after[n].dtype == before[n].dtype and after[n].shape == before[n].shape for n in before)
        changed = {n for n in before if not torch.equal(before[n], after[n])}
        assert all(n.endswith(("super_scales", "weight_scale", "norm.weight", "layernorm.weight"))
                   for n in changed), sorted(changed)
        assert not any(n.endswith(("quant_weight", "code_scale", "code_zp")) for n in changed)
        k = {m: before[f"{m}.quant_weight"].shape[0] * L.PACK for m in wint2}
        nibbles = {m: (_nibbles(before[f"{m}.weight_scale"], k[m]), _nibbles(after[f"{m}.weight_scale"], k[m]))
                   for m in wint2}
        moved = sum(int((b != a).sum()) for b, a in nibbles.values())
        total = sum(b.numel() for b, _ in nibbles.values())
        assert 0 < moved < 0.5 * total, (moved, total)
        assert all(((b - a).abs() <= 3).all() for b, a in nibbles.values())       # small relative steps
    assert history[-1]["nibbles_changed"] == moved
    assert min(h["heldout_kl"] for h in history[1:]) < history[0]["heldout_kl"]


def test_moving_nibbles_fits_the_teacher_better_than_scales_alone(tuned):
    _, history, scale_only = tuned
    best = {name: min(h["heldout_kl"] for h in hist[1:]) for name, hist in
            (("groups", history), ("scales", scale_only))}
    assert best["groups"] < best["scales"], (best, history, scale_only)


def test_engine_runs_what_the_group_student_trained(tuned, tiny_llama_dir):
    root, _, _ = tuned
    assert_engine_matches_student(tiny_llama_dir, root / "groups")


def test_bad_group_lr(tiny_llama_dir, tmp_path, capsys):
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="group_lr must be >= 0"):
            TuneSpec(group_lr=bad)
    with pytest.raises(ValueError, match="code_lr and group_lr cannot both be > 0"):
        TuneSpec(code_lr=0.1, group_lr=0.1)
    from calib.wint2.writer import main as writer_main
    calib = word_text_file(tmp_path / "c.jsonl", num_texts=4)
    with pytest.raises(SystemExit):
        writer_main(["--model_path", str(tiny_llama_dir), "--save_directory", str(tmp_path / "x"),
                     "--calib_file", str(calib), "--tune_epochs", "1", "--tune_group_lr", "-1"])
    assert "group_lr must be >= 0 (0: group nibbles fixed), got -1.0" in capsys.readouterr().err
