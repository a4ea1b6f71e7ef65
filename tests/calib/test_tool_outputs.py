"""Output conventions of the smaller calib tools: calib.block_fp8's report JSON, and the JSONL of
calib.synthetic / calib.mix written atomically and never over an existing file without --overwrite
(calib/output_dir.py check_output_file / staged_file / write_jsonl)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from calib.block_fp8 import main as block_fp8_main
from calib.config import CalibError
from calib.mix import main as mix_main
from calib.output_dir import check_output_file, staged_file, write_jsonl
from calib.synthetic import SyntheticSpec, write_synthetic_calib
from calib.synthetic import main as synthetic_main
from calib.texts import read_calib_texts


def _write(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def _beside(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def test_block_fp8_report_has_the_common_keys(tiny_llama_dir, tmp_path):
    out = tmp_path / "fp8"
    assert block_fp8_main(["--model_path", str(tiny_llama_dir), "--save_directory", str(out), "--method", "rtn",
                           "--weight_block_size", "32", "32", "--no_progress"]) == 0
    report = json.loads((out / "block_fp8_report.json").read_text())
    assert {"tool", "model_path", "arguments", "started_at", "finished_at", "stage_seconds", "total_seconds",
            "method", "weight_block_size", "layers"} <= set(report)
    assert report["tool"] == "calib.block_fp8" and report["arguments"]["weight_block_size"] == [32, 32]
    assert {"load", "quantize", "write"} <= set(report["stage_seconds"])


def test_block_fp8_bad_model_path_is_an_error_line(tmp_path, capsys):
    assert block_fp8_main(["--model_path", str(tmp_path / "nope"), "--save_directory", str(tmp_path / "o"),
                           "--method", "rtn"]) == 2
    err = capsys.readouterr().err
    assert "--model_path" in err and "Traceback" not in err and not (tmp_path / "o").exists()


def test_staged_file_publishes_at_the_end_or_not_at_all(tmp_path):
    target = tmp_path / "t.jsonl"
    target.write_text("old\n")
    with pytest.raises(RuntimeError):
        with staged_file(target) as staging:
            staging.write_text("half")
            assert target.read_text() == "old\n"              # nothing visible before the end
            raise RuntimeError("interrupted")
    assert target.read_text() == "old\n" and _beside(target) == ["t.jsonl"]
    write_jsonl(target, ({"text": t} for t in ("a", "b")))
    assert read_calib_texts(target) == ["a", "b"] and _beside(target) == ["t.jsonl"]


def test_check_output_file(tmp_path):
    assert check_output_file(tmp_path / "new.jsonl", overwrite=False) == (tmp_path / "new.jsonl").resolve()
    _write(tmp_path / "old.jsonl", ["x"])
    with pytest.raises(CalibError, match="exists; pass --overwrite"):
        check_output_file(tmp_path / "old.jsonl", overwrite=False)
    assert check_output_file(tmp_path / "old.jsonl", overwrite=True).name == "old.jsonl"
    with pytest.raises(CalibError, match="is a directory"):
        check_output_file(tmp_path, overwrite=True)


def test_mix_refuses_an_existing_output_and_overwrites_when_asked(tmp_path, capsys):
    first, second = _write(tmp_path / "g.jsonl", ["g1", "g2"]), _write(tmp_path / "p.jsonl", ["p1", "p2"])
    out = _write(tmp_path / "mix.jsonl", ["previous"])
    args = ["--first", str(first), "--second", str(second), "--output", str(out)]
    with pytest.raises(SystemExit) as exc:
        mix_main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "exists; pass --overwrite" in err and "Traceback" not in err
    assert read_calib_texts(out) == ["previous"]
    mix_main([*args, "--overwrite"])
    assert read_calib_texts(out) == ["g1", "p1", "g2", "p2"]
    assert _beside(out) == ["g.jsonl", "mix.jsonl", "p.jsonl"]


def test_mix_failure_midway_keeps_the_old_file(tmp_path, monkeypatch):
    def failing(*args, **kwargs):          # two texts written, then the stream breaks
        yield "one"
        yield "two"
        raise OSError("disk full (injected)")

    monkeypatch.setattr("calib.mix.interleave_texts", failing)
    first, second = _write(tmp_path / "g.jsonl", ["g1"]), _write(tmp_path / "p.jsonl", ["p1"])
    out = _write(tmp_path / "mix.jsonl", ["previous"])
    with pytest.raises(SystemExit):
        mix_main(["--first", str(first), "--second", str(second), "--output", str(out), "--overwrite"])
    assert read_calib_texts(out) == ["previous"] and _beside(out) == ["g.jsonl", "mix.jsonl", "p.jsonl"]
    new = tmp_path / "new.jsonl"
    with pytest.raises(SystemExit):
        mix_main(["--first", str(first), "--second", str(second), "--output", str(new)])
    assert not new.exists() and "new.jsonl" not in " ".join(_beside(out))


def test_synthetic_refuses_an_existing_output_before_sampling(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("ascend_llm.LLM", None)          # refused before any engine is built
    out = _write(tmp_path / "gen.jsonl", ["previous"])
    with pytest.raises(SystemExit) as exc:
        synthetic_main(["--model", str(tiny_llama_dir), "--output", str(out), "--num_texts", "1"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "exists; pass --overwrite" in err and "Traceback" not in err
    assert read_calib_texts(out) == ["previous"]


def test_synthetic_overwrites_atomically(tiny_llama_dir, tmp_path, monkeypatch):
    out = _write(tmp_path / "gen.jsonl", ["previous"])
    spec = SyntheticSpec(num_texts=2, max_tokens=4)

    def failing(*args, **kwargs):
        raise OSError("engine died (injected)")

    monkeypatch.setattr("calib.synthetic.sample_token_ids", failing)
    with pytest.raises(OSError, match="injected"):
        write_synthetic_calib(str(tiny_llama_dir), out, spec, overwrite=True, max_model_len=16)
    assert read_calib_texts(out) == ["previous"] and _beside(out) == ["gen.jsonl"]
    monkeypatch.undo()
    texts = write_synthetic_calib(str(tiny_llama_dir), out, spec, overwrite=True, max_model_len=16)
    assert read_calib_texts(out) == texts and len(texts) == 2 and _beside(out) == ["gen.jsonl"]
