"""The accuracy guard (#29 part 3): `python -m calib` writes accuracy_reference.json, `ascend-llm
verify` replays it; a checkpoint with one layer's scales x4 loads but fails; missing / malformed
files are reported naming what is wrong; `verify --reference` on an msModelSlim fixture."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ascend_llm import LLM
from ascend_llm.cli import main
from ascend_llm.eval.accuracy_guard import verify
from ascend_llm.eval.accuracy_reference import (FILE_NAME, AccuracyReferenceError, load_reference,
                                                parse_reference)
from tests.tiny_models import init_tiny_weights, make_tokenizer, tiny_config

PEER_W8A8 = Path(__file__).parents[1] / "fixtures" / "peer_checkpoints" / "msmodelslim" / "llama_w8a8"


def test_calib_writes_a_small_reference_with_its_own_scores(good_dir):
    reference = load_reference(good_dir)
    assert (good_dir / FILE_NAME).stat().st_size < 80_000
    assert reference.top_k == 8 and len(reference.prompts) >= 3
    assert {p.source for p in reference.prompts} == {"calibration-heldout", "generic"}
    conv = reference.at_conversion
    assert conv is not None and conv["backend"] == "cpu"
    assert conv["mean_kl"] < 0.05 and conv["top1_agreement"] > 0.8


def test_good_checkpoint_replays_the_recorded_numbers(good_dir):
    reference = load_reference(good_dir)
    with LLM(str(good_dir), device="cpu", enforce_eager=True, kv_cache_memory_gb=0.05) as llm:
        report = verify(llm.llm_engine, reference)
    assert report.ok, report.text()
    for key in ("mean_kl", "top1_agreement", "ppl_ratio"):
        assert getattr(report.scores, key) == pytest.approx(reference.at_conversion[key], abs=1e-4)


def test_verify_cli_passes_good_and_fails_damaged(good_dir, damaged_dir, capsys):
    assert main(["verify", str(good_dir), "--device", "cpu", "--json"]) == 0
    good = json.loads(capsys.readouterr().out)
    assert good["ok"] and good["at_conversion"]["mean_kl"] == pytest.approx(good["replayed"]["mean_kl"], abs=1e-4)
    # tiny random models predict nearly flat distributions (vocab 128): the float top-8 holds ~6% of
    # the mass, so KL over top-8 + lumped tail is small even when damaged (measured 2.5e-5 good,
    # 0.027 damaged); top-1 agreement (0.95 good, 0.21 damaged) trips the default threshold
    assert main(["verify", str(damaged_dir), "--device", "cpu", "--max-kl", "0.001"]) == 1
    out = capsys.readouterr().out
    assert "FAIL: mean KL(float || quantized)" in out and "top-1 agreement" in out


def test_missing_and_malformed_references_are_named(good_dir, tmp_path, caplog):
    bare = tmp_path / "bare"
    shutil.copytree(good_dir, bare)
    (bare / FILE_NAME).unlink()
    assert main(["verify", str(bare), "--device", "cpu"]) == 2
    assert "no accuracy reference in the checkpoint" in caplog.text and "--reference" in caplog.text
    (bare / FILE_NAME).write_text("{not json")
    with pytest.raises(AccuracyReferenceError, match="not valid JSON"):
        load_reference(bare)
    data = json.loads((good_dir / FILE_NAME).read_text())
    for broken, message in ((dict(data, version=9), "version"), ({k: v for k, v in data.items() if k != "float"},
                            "float: missing"), (dict(data, prompts=[dict(data["prompts"][0], top_ids=[])]),
                            r"prompts\[0\]: top_ids / top_logprobs need")):
        with pytest.raises(AccuracyReferenceError, match=message):
            parse_reference(broken)


@pytest.fixture(scope="module")
def peer_float_dir(tmp_path_factory) -> Path:
    """The float model scripts/peer_msmodelslim.py calibrated (tiny llama, vocab 128, seed 0),
    rebuilt; checked against the fixture's reference/logits.safetensors float_logits."""
    torch.manual_seed(0)
    config, cls = tiny_config("llama", vocab_size=128)
    model = cls(config).eval()
    init_tiny_weights(model, config.hidden_size)
    ref = load_file(PEER_W8A8 / "reference" / "logits.safetensors")
    with torch.no_grad():
        assert torch.allclose(model(ref["input_ids"]).logits, ref["float_logits"], atol=1e-4)
    out = tmp_path_factory.mktemp("peer_float")
    model.save_pretrained(out, safe_serialization=True)
    make_tokenizer().save_pretrained(out)
    return out


def test_verify_reference_builds_the_report_for_a_peer_checkpoint(peer_float_dir, capsys):
    code = main(["verify", str(PEER_W8A8), "--reference", str(peer_float_dir), "--device", "cpu", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    assert report["replayed"]["num_positions"] > 50 and report["at_conversion"] is None
    assert report["replayed"]["mean_kl"] < 0.01 and report["replayed"]["top1_agreement"] > 0.85     # measured 0.899
    assert main(["verify", str(PEER_W8A8), "--reference", str(peer_float_dir), "--device", "cpu"]) == 0
    assert "PASS" in capsys.readouterr().out                 # the table, with no numbers at conversion
