"""calib.wint2.writer / calib.wint2.tune follow `python -m calib`'s output conventions: a non-empty
--save_directory is refused without --overwrite, the checkpoint is published atomically (nothing
left behind by a failed run), calib_report.json describes the run, bad inputs are one error line
with exit code 2, and the writer's --recipe values apply unless a flag overrides them."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from calib.config import CalibError
from calib.report import REPORT_FILE
from calib.wint2.calibration import CalibSpec
from calib.wint2.tune import TuneSpec, tune_wint2_checkpoint
from calib.wint2.tune import main as tune_main
from calib.wint2.writer import WINT2_RECIPES_DIR, build_parser, resolve_options, write_wint2_checkpoint
from calib.wint2.writer import main as writer_main
from tests.calib.wint2.word_text import word_text_file

REPO = Path(__file__).resolve().parents[3]
REPORT_KEYS = {"tool", "model_path", "save_directory", "arguments", "started_at", "finished_at",
               "stage_seconds", "total_seconds"}


def siblings(out: Path) -> list[str]:
    """Everything beside `out` in its parent (staging or untuned leftovers would show up here)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


def full_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "keep.txt").write_text("mine")
    return path


def writer(tiny_llama_dir: Path, out: Path, *flags: str) -> list[str]:
    return ["--model_path", str(tiny_llama_dir), "--save_directory", str(out), *flags]


@pytest.fixture(scope="module")
def plain(tiny_llama_dir, tmp_path_factory) -> Path:
    """The tiny Llama written by the plain encoder through the CLI (MLP WINT2, attention wint8)."""
    out = tmp_path_factory.mktemp("conventions") / "plain"
    assert writer_main(writer(tiny_llama_dir, out)) == 0
    return out


# ------------------------------------------------------------------------------------------------
# calib.wint2.writer
# ------------------------------------------------------------------------------------------------

def test_writer_report_json(plain, tiny_llama_dir):
    report = json.loads((plain / REPORT_FILE).read_text())
    assert REPORT_KEYS <= set(report)
    assert report["tool"] == "calib.wint2.writer" and report["model_path"] == str(tiny_llama_dir)
    assert report["arguments"]["method"] == "plain" and report["arguments"]["overwrite"] is False
    assert set(report["stage_seconds"]) == {"encode", "write"}
    assert len(report["modules"]) == 2 * 7                      # 2 layers x 7 Linears
    assert {m["kind"] for m in report["modules"]} == {"wint2", "wint8"}
    assert 0.2 < report["mean_relative_error"]["wint2"] < 0.4
    assert report["quantization_config"]["quantization"] == "wint2"
    assert siblings(plain) == []


def test_writer_refuses_a_non_empty_directory_without_overwrite(tiny_llama_dir, tmp_path, capsys):
    out = full_dir(tmp_path / "out")
    assert writer_main(writer(tiny_llama_dir, out)) == 2
    err = capsys.readouterr().err
    assert f"--save_directory: '{out}' exists and is not empty" in err and "--overwrite" in err
    assert "Traceback" not in err and sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert writer_main(writer(tiny_llama_dir, out, "--overwrite", "--dense_wint2_modules", "mlp.down_proj")) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert json.loads((out / REPORT_FILE).read_text())["arguments"]["overwrite"] is True
    assert siblings(out) == []


def test_writer_bad_model_path_is_an_error_line(tmp_path, capsys):
    out = tmp_path / "out"
    assert writer_main(writer(tmp_path / "missing_model", out)) == 2
    err = capsys.readouterr().err
    assert "--model_path" in err and "missing_model" in err and "Traceback" not in err
    assert not out.exists()
    with pytest.raises(CalibError, match="--model_path"):
        write_wint2_checkpoint(tmp_path / "missing_model", out)


def _fail(*args, **kwargs):
    raise OSError("disk full (injected)")


def test_writer_failure_midway_leaves_nothing(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("calib.wint2.writer._write_config", _fail)     # after the weights are written
    out = tmp_path / "out"
    with pytest.raises(OSError, match="injected"):
        write_wint2_checkpoint(tiny_llama_dir, out)
    assert not out.exists() and siblings(out) == []


def test_writer_failure_midway_keeps_the_old_content(plain, tmp_path, tiny_llama_dir, monkeypatch, capsys):
    out = tmp_path / "out"
    assert writer_main(writer(tiny_llama_dir, out)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr("calib.wint2.writer._copy_side_files", _fail)
    assert writer_main(writer(tiny_llama_dir, out, "--overwrite", "--dense_quant_type", "wint4")) == 2
    assert "disk full (injected)" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and siblings(out) == []


def test_writer_with_tuning_failing_leaves_nothing(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    calib = word_text_file(tmp_path / "c.jsonl", num_texts=8)
    out = tmp_path / "w" / "tuned"
    monkeypatch.setattr("calib.wint2.tune.tuned_tensors", _fail)        # after training, while writing
    assert writer_main(writer(tiny_llama_dir, out, "--calib_file", str(calib), "--calib_num_samples", "8",
                              "--calib_seq_len", "32", "--tune_epochs", "1")) == 2
    assert "disk full (injected)" in capsys.readouterr().err
    assert sorted(p.name for p in out.parent.iterdir()) == []         # no untuned copy, no staging


def test_writer_with_tuning_writes_one_report(tiny_llama_dir, tmp_path):
    calib = word_text_file(tmp_path / "c.jsonl", num_texts=8)
    out = tmp_path / "w" / "tuned"
    assert writer_main(writer(tiny_llama_dir, out, "--calib_file", str(calib), "--calib_num_samples", "8",
                              "--calib_seq_len", "32", "--tune_epochs", "1")) == 0
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["tool"] == "calib.wint2.writer" and report["arguments"]["tune_epochs"] == 1
    assert {"encode", "write", "tune"} <= set(report["stage_seconds"])
    assert len(report["modules"]) == 14 and [e["epoch"] for e in report["tune_history"]] == [0, 1]
    assert sorted(p.name for p in out.parent.iterdir()) == ["tuned"]


# ------------------------------------------------------------------------------------------------
# --recipe
# ------------------------------------------------------------------------------------------------

def _options(*argv: str) -> dict:
    return resolve_options(build_parser(), ["--model_path", "m", "--save_directory", "o", *argv])


def test_bundled_recipe_values_and_flag_overrides():
    assert (WINT2_RECIPES_DIR / "wint2_gptq.yaml").is_file()
    opts = _options("--recipe", "wint2_gptq")
    assert (opts["method"], opts["calib_num_samples"], opts["calib_holdout_samples"]) == ("gptq", 256, 8)
    assert (opts["tune_epochs"], opts["tune_lr"], opts["tune_group_lr"]) == (2, 0.003, 0.01)
    assert opts["act_order"] == ["none", "group"] and len(opts["code_scales"]) == 3
    opts = _options("--recipe", "wint2_gptq", "--calib_num_samples", "4", "--tune_epochs", "0",
                    "--act_order", "none")
    assert (opts["calib_num_samples"], opts["tune_epochs"], opts["act_order"]) == (4, 0, ["none"])
    assert opts["method"] == "gptq" and opts["calib_holdout_samples"] == 8          # still the recipe's
    assert _options()["method"] == "plain" and _options()["tune_epochs"] == 0       # no recipe: defaults


def test_recipe_values_are_converted_and_checked_like_flags(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("tune_lr: 3e-3\ncode_scales: 120.89453125\ndense_wint2_modules: mlp.up_proj mlp.down_proj\n")
    opts = _options("--recipe", str(recipe))                     # PyYAML reads 3e-3 as a string
    assert opts["tune_lr"] == 0.003 and opts["code_scales"] == [120.89453125]
    assert opts["dense_wint2_modules"] == ["mlp.up_proj", "mlp.down_proj"]
    for text, message in [("bogus: 1\n", r"unknown option\(s\) \['bogus'\]"),
                          ("method: awq\n", "'awq' is not one of"),
                          ("calib_num_samples: many\n", "calib_num_samples: bad value"),
                          ("act_order: {a: 1}\n", "act_order: expected a list")]:
        recipe.write_text(text)
        with pytest.raises(CalibError, match=message):
            _options("--recipe", str(recipe))
    with pytest.raises(CalibError, match="neither a file nor a bundled recipe.*wint2_gptq"):
        _options("--recipe", "no_such_recipe")


def test_recipe_through_the_cli(tiny_llama_dir, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("dense_wint2_modules: [mlp.down_proj]\ndense_quant_type: wint4\n")
    out = tmp_path / "out"
    assert writer_main(writer(tiny_llama_dir, out, "--recipe", str(recipe), "--dense_quant_type", "wint8")) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["dense_wint2_modules"] == ["mlp.down_proj"] and qc["dense_quant_type"] == "wint8"
    assert json.loads((out / REPORT_FILE).read_text())["arguments"]["recipe"] == str(recipe)
    recipe.write_text("method: bogus\n")
    with pytest.raises(SystemExit) as exc:
        writer_main(writer(tiny_llama_dir, tmp_path / "x", "--recipe", str(recipe)))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "'bogus' is not one of" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------
# calib.wint2.tune
# ------------------------------------------------------------------------------------------------

def _tune_args(tiny_llama_dir: Path, quant: Path, out: Path, calib: Path, *flags: str) -> list[str]:
    return ["--model_path", str(tiny_llama_dir), "--quant_path", str(quant), "--save_directory", str(out),
            "--calib_file", str(calib), "--calib_num_samples", "6", "--calib_seq_len", "32",
            "--calib_holdout_samples", "2", "--epochs", "1", *flags]


def test_tune_conventions(plain, tiny_llama_dir, tmp_path, capsys):
    calib = word_text_file(tmp_path / "c.jsonl", num_texts=8)
    out = full_dir(tmp_path / "w" / "out")
    assert tune_main(_tune_args(tiny_llama_dir, plain, out, calib)) == 2
    err = capsys.readouterr().err
    assert "exists and is not empty" in err and "--overwrite" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert tune_main(_tune_args(tiny_llama_dir, plain, out, calib, "--overwrite")) == 0
    assert not (out / "keep.txt").exists() and siblings(out) == []
    report = json.loads((out / REPORT_FILE).read_text())
    assert REPORT_KEYS <= set(report) and report["tool"] == "calib.wint2.tune"
    assert report["arguments"]["quant_path"] == str(plain) and report["arguments"]["epochs"] == 1
    assert [e["epoch"] for e in report["tune_history"]] == [0, 1]
    assert report["quant_report"]["tool"] == "calib.wint2.writer"       # where the input came from
    assert tune_main(_tune_args(tmp_path / "missing_model", plain, tmp_path / "o2", calib)) == 2
    err = capsys.readouterr().err
    assert "--model_path" in err and "Traceback" not in err and not (tmp_path / "o2").exists()


def test_tune_failure_midway_leaves_nothing(plain, tiny_llama_dir, tmp_path, monkeypatch):
    calib = CalibSpec(str(word_text_file(tmp_path / "c.jsonl", num_texts=8)), num_samples=4, seq_len=32)
    monkeypatch.setattr("calib.wint2.tune.save_file", _fail)             # the copy of the rest is done
    out = tmp_path / "w" / "out"
    with pytest.raises(OSError, match="injected"):
        tune_wint2_checkpoint(tiny_llama_dir, plain, out, calib, TuneSpec(epochs=1))
    assert sorted(p.name for p in out.parent.iterdir()) == []


@pytest.mark.parametrize("module, extra", [("calib.wint2.writer", []),
                                           ("calib.wint2.tune", ["--quant_path", "q", "--calib_file", "c"])])
def test_python_dash_m_exit_code(module, extra, tmp_path):
    result = subprocess.run([sys.executable, "-m", module, "--model_path", str(tmp_path / "missing_model"),
                             "--save_directory", str(tmp_path / "o"), *extra],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "missing_model" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()
