"""Every quantizing tool writes accuracy_reference.json: calib.block_fp8 and the WINT2 writer
compute it from the float source; the converter carries the source's over and re-measures it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ascend_llm.eval.accuracy_reference import FILE_NAME, load_reference
from calib.block_fp8 import BlockFp8Options, convert as block_fp8
from calib.convert.cli import convert
from calib.wint2.writer import write_wint2_checkpoint
from tests.eval.test_accuracy_guard import PEER_W8A8

FP8_CASES = ("block_fp8", "wint2")


def _write(kind: str, source: Path, out: Path) -> None:
    if kind == "block_fp8":
        block_fp8(BlockFp8Options(str(source), str(out), method="rtn", weight_block_size=(32, 32), progress=False))
    else:
        write_wint2_checkpoint(source, out)


@pytest.mark.parametrize("kind", FP8_CASES)
def test_float_source_tools_write_a_scored_reference(kind, tiny_llama_dir, tmp_path):
    out = tmp_path / kind
    _write(kind, Path(tiny_llama_dir), out)
    reference = load_reference(out)
    assert reference.writer["tool"].startswith("calib.") and reference.source_model
    assert {p.source for p in reference.prompts} == {"generic"} and len(reference.prompts) >= 2
    conv = reference.at_conversion
    assert conv is not None and conv["backend"] == "cpu" and conv["num_positions"] > 50
    assert 0 <= conv["mean_kl"] and 0 < conv["top1_agreement"] <= 1


def test_converter_carries_the_reference_over_and_remeasures(good_dir, tmp_path):
    out = tmp_path / "ct"
    report = convert("ascendv1", "compressed-tensors", good_dir, out)
    assert report.summary["accuracy_reference"].startswith("carried over from the source; at_conversion re-measured")
    source, carried = load_reference(good_dir), load_reference(out)
    assert carried.writer["carried_by"] == "calib.convert"
    assert [p.token_ids for p in carried.prompts] == [p.token_ids for p in source.prompts]
    # a lossless conversion: the converted checkpoint scores like the source did
    for key in ("mean_kl", "top1_agreement", "ppl_ratio"):
        assert carried.at_conversion[key] == pytest.approx(source.at_conversion[key], abs=1e-3)
    assert json.loads((out / FILE_NAME).read_text())["source_at_conversion"] == source.at_conversion


def test_converter_without_a_source_reference_says_so(tmp_path):
    out = tmp_path / "ct"
    report = convert("ascendv1", "compressed-tensors", PEER_W8A8, out)
    assert report.summary["accuracy_reference"].startswith("none: the source has no accuracy_reference.json")
    assert not (out / FILE_NAME).exists()


def test_wint2_tuning_remeasures_the_writers_reference(tiny_llama_dir, tmp_path):
    from calib.wint2.calibration import CalibSpec
    from calib.wint2.tune import TuneSpec, tune_wint2_checkpoint
    from tests.calib.wint2.word_text import word_text_file
    write_wint2_checkpoint(tiny_llama_dir, tmp_path / "plain")
    calib = CalibSpec(str(word_text_file(tmp_path / "calib.jsonl", num_texts=12)), num_samples=4, seq_len=16)
    tune_wint2_checkpoint(tiny_llama_dir, tmp_path / "plain", tmp_path / "tuned", calib, TuneSpec(epochs=1, lr=1e-2))
    plain, tuned = load_reference(tmp_path / "plain"), load_reference(tmp_path / "tuned")
    assert [p.token_ids for p in tuned.prompts] == [p.token_ids for p in plain.prompts]
    assert tuned.extra["source_at_conversion"] == plain.at_conversion
    assert tuned.at_conversion is not None and tuned.at_conversion["mean_kl"] != plain.at_conversion["mean_kl"]
