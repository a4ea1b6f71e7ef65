"""WINT2 tuning with moving bytes (calib/wint2/tune_codes.py, `TuneSpec.code_lr`) on a tiny Llama.

The byte codebook is sparse in window space (the second-nearest byte of a written one is about
16 window units away, squared distance ~264), so bytes flip only when the latent weight drifts
far: on this model code_lr 0.5 over 48 steps moved ~1 % of the bytes and lowered held-out KL
0.0351 -> 0.0347 (unseen 0.0512 -> 0.0506) against scale-only tuning; code_lr 1.0 moved 30 %
and was worse (0.049), 3.0 never beat the untuned checkpoint (held-out picks epoch 0).
"""
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
from calib.wint2.tune_codes import Wint2CodeLinear
from tests.calib.wint2.test_wint2_tune import assert_engine_matches_student
from tests.calib.wint2.wint2_written import first_wint2, written  # noqa: F401 (fixture)
from tests.calib.wint2.word_text import word_text_file


def test_layer_starts_as_the_written_codes_and_flips_a_byte_when_pushed(written):
    name, t = first_wint2(written)
    layer = Wint2CodeLinear(t, None)
    ones = torch.ones_like(t["super_scales"], dtype=torch.float32)
    codes = L.dequantize_wint2(t["quant_weight"], t["weight_scale"], ones, t["code_scale"], t["code_zp"])
    fixed = ScaledCodeLinear(codes, t["super_scales"], None)
    x = torch.randn(3, codes.shape[1])
    torch.testing.assert_close(layer(x), fixed(x), rtol=1e-6, atol=1e-6)
    assert torch.equal(layer.quant_weight(), t["quant_weight"]) and layer.num_changed(t["quant_weight"]) == 0
    layer(x).square().sum().backward()
    assert layer.shift.grad is not None and layer.shift.grad.abs().sum() > 0     # straight-through
    # push tuple (column 3, packed row 1) onto another byte's windows: exactly that byte changes
    col, row = 3, 1
    current = int(t["quant_weight"][row, col])
    other = (current + 7) % 256
    with torch.no_grad():
        layer.shift[col, row] = layer.book[col, other] - layer.base_windows[col, row]
    new = layer.quant_weight()
    assert layer.num_changed(t["quant_weight"]) == 1
    assert torch.equal(layer.book[col, int(new[row, col])], layer.book[col, other])
    moved = fixed.codes.clone()
    moved[col, 4 * row:4 * row + 4] = layer.book[col, other] * layer.nibble[col, row]
    with torch.no_grad():
        fixed.codes.copy_(moved)
        torch.testing.assert_close(layer(x), fixed(x), rtol=1e-6, atol=1e-5)


@pytest.fixture(scope="module")
def tuned(written, tiny_llama_dir) -> tuple[Path, list[dict]]:
    calib = word_text_file(written / "calib.jsonl", num_texts=12)
    tune_main(["--model_path", str(tiny_llama_dir), "--quant_path", str(written / "plain"),
               "--save_directory", str(written / "codes"), "--calib_file", str(calib),
               "--calib_num_samples", "16", "--calib_seq_len", "48", "--calib_holdout_samples", "2",
               "--epochs", "3", "--lr", "1e-2", "--code_lr", "0.5"])
    spec = CalibSpec(str(calib), num_samples=16, seq_len=48, holdout_samples=2)
    history = tune_wint2_checkpoint(tiny_llama_dir, written / "plain", written / "codes_api", spec,
                                    TuneSpec(epochs=3, lr=1e-2, code_lr=0.5))
    return written, history


def test_bytes_move_and_nothing_else_discrete_changes(tuned):
    root, history = tuned
    before = load_file(str(root / "plain" / "model.safetensors"))
    for out in ("codes", "codes_api"):                   # the CLI and the API write the same file
        after = load_file(str(root / out / "model.safetensors"))
        assert before.keys() == after.keys()
        changed = {n for n in before if not torch.equal(before[n], after[n])}
        assert all(n.endswith(("quant_weight", "super_scales", "weight_scale", "norm.weight", "layernorm.weight"))
                   for n in changed), sorted(changed)
        assert not any(n.endswith(("code_scale", "code_zp")) for n in changed)
        nibbles = [n for n in before if n.endswith("weight_scale") and n.replace("weight_scale", "quant_weight") in before]
        assert all(torch.equal(before[n], after[n]) for n in nibbles)
        moved = sum(int((before[n] != after[n]).sum()) for n in before if n.endswith("quant_weight"))
        total = sum(before[n].numel() for n in before if n.endswith("quant_weight"))
        assert 0 < moved < 0.1 * total
    assert history[-1]["bytes_changed"] == moved
    assert min(h["heldout_kl"] for h in history[1:]) < history[0]["heldout_kl"]


def test_engine_runs_what_the_code_student_trained(tuned, tiny_llama_dir):
    root, _ = tuned
    assert_engine_matches_student(tiny_llama_dir, root / "codes", move_codes=True)


def test_bad_code_lr(tiny_llama_dir, tmp_path, capsys):
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="code_lr must be >= 0"):
            TuneSpec(code_lr=bad)
    from calib.wint2.writer import main as writer_main
    calib = word_text_file(tmp_path / "c.jsonl", num_texts=4)
    with pytest.raises(SystemExit):
        writer_main(["--model_path", str(tiny_llama_dir), "--save_directory", str(tmp_path / "x"),
                     "--calib_file", str(calib), "--tune_epochs", "1", "--tune_code_lr", "-1"])
    assert "code_lr must be >= 0 (0: codes fixed), got -1.0" in capsys.readouterr().err
