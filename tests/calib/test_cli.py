"""`python -m calib` / `ascend-llm-calib`: msModelSlim arguments, recipes, errors exit 2."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from calib.cli import main
from calib.config import CalibConfig, CalibError, build_config, load_recipe
from calib.dataset import load_calib_texts
from tests.shared_data import CALIB_PROSE

CALIB_FILE = str(CALIB_PROSE)
REPO = Path(__file__).resolve().parents[2]


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def base_args(model_dir, out_dir, calib_file=CALIB_FILE) -> list[str]:
    return ["--model_path", str(model_dir), "--save_directory", str(out_dir), "--calib_file",
            str(calib_file), "--num_samples", "2", "--max_tokens", "32", "--no_progress"]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("content,message", [
    ("", "holds no calibration texts"),
    ("\n\n", "holds no calibration texts"),
    ('{"text": "fine"}\n{"text": "broken\n', r"data.jsonl:2: malformed JSON line"),
    ('{"question": "no text here"}\n', r"data.jsonl:1: no non-empty text under any known key"),
    ('["a list"]\n', r"data.jsonl:1: expected a JSON object"),
])
def test_bad_calibration_files_exit_2(tiny_llama_dir, tmp_path, capsys, content, message):
    data = write(tmp_path / "data.jsonl", content)
    code, _, err = run_cli(capsys, *base_args(tiny_llama_dir, tmp_path / "out", data))
    assert code == 2
    assert "Traceback" not in err
    assert re.search(message, err), err


def test_missing_calibration_file_exits_2(tiny_llama_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, *base_args(tiny_llama_dir, tmp_path / "out", tmp_path / "nope.jsonl"))
    assert code == 2 and "nope.jsonl' does not exist" in err


@pytest.mark.parametrize("flags,message", [
    (["--anti_method", "m9"], "--anti_method: unknown method 'm9'"),
    (["--act_method", "4"], "--act_method: unknown value 4"),
    (["--disable_level", "X3"], "--disable_level: expected L0, L1, ... Ln, got 'X3'"),
    (["--w_bit", "4"], "--w_bit 4 --a_bit 8: 4-bit weights are weight-only here (W4A16)"),
    (["--w_bit", "3"], "--w_bit: 4 or 8 expected, got 3"),
    (["--a_bit", "4"], "--a_bit: 8 or 16 expected, got 4"),
    (["--a_bit", "16", "--is_dynamic"], "need --a_bit 8"),
    (["--device_type", "tpu"], "--device_type: expected one of cpu, cuda, npu"),
    (["--recipe", "no_such_recipe"], "--recipe: 'no_such_recipe' is neither a file nor a bundled recipe"),
    (["--kv_asymmetric"], "--kv_asymmetric shapes the C8 KV-cache scales; it needs --use_kvcache_quant"),
])
def test_bad_options_exit_2_naming_the_option(tiny_llama_dir, tmp_path, capsys, flags, message):
    code, _, err = run_cli(capsys, *base_args(tiny_llama_dir, tmp_path / "out"), *flags)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_and_missing_model_exit_2(tmp_path, capsys):
    model = tmp_path / "gpt2"
    model.mkdir()
    write(model / "config.json", json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    code, _, err = run_cli(capsys, *base_args(model, tmp_path / "out"))
    assert code == 2 and "unsupported architecture ['GPT2LMHeadModel']" in err
    assert "LlamaForCausalLM, Qwen2ForCausalLM" in err
    code, _, err = run_cli(capsys, *base_args(tmp_path / "missing_model", tmp_path / "out"))
    assert code == 2 and "--model_path" in err and "missing_model" in err


def test_anti_method_without_the_module_is_a_clear_error(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "calib.anti_outlier", None)      # import fails like a missing file
    code, _, err = run_cli(capsys, *base_args(tiny_llama_dir, tmp_path / "out"), "--anti_method", "m1")
    assert code == 2 and "--anti_method m1: the anti-outlier module" in err


def test_recipes_load_and_flags_override_them(tmp_path):
    assert load_recipe("w8a8_dynamic")["is_dynamic"] is True
    for recipe in sorted((REPO / "calib" / "recipes").glob("*.yaml")):
        load_recipe(str(recipe))                                 # every bundled recipe is valid
    cfg = build_config({"recipe": "w8a8_smooth", "model_path": "m", "save_directory": "o",
                        "calib_file": "c", "disable_level": "L5", "act_method": None})
    assert (cfg.anti_method, cfg.disable_level, cfg.act_method) == ("m2", "L5", 1)
    bad = write(tmp_path / "bad.yaml", "w_bit: 8\nbogus_option: 1\n")
    with pytest.raises(CalibError, match=r"unknown option\(s\) \['bogus_option'\]"):
        load_recipe(str(bad))
    with pytest.raises(CalibError, match="--w_bit"):
        build_config({"recipe": str(write(tmp_path / "w4.yaml", "w_bit: 4\n")),
                      "model_path": "m", "save_directory": "o", "calib_file": "c"})


def test_text_keys_in_priority_order(tmp_path):
    data = write(tmp_path / "d.jsonl", '{"inputs_pretokenized": "a", "text": "b"}\n{"prompt": "c"}\n'
                                       '\n{"text": "d", "id": 4}\n')
    assert load_calib_texts(data) == ["a", "c", "d"]
    assert load_calib_texts(data, num_samples=2) == ["a", "c"]


def test_cli_run_prints_the_summary_and_writes_the_report(tiny_qwen2_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = run_cli(capsys, *base_args(tiny_qwen2_dir, out), "--recipe", "w8a8",
                              "--disable_level", "L1", "--act_method", "2")
    assert code == 0
    assert "model_quant_type: W8A8" in stdout and "float fall-backs (" in stdout
    assert "model.layers.0.self_attn.q_proj" in stdout and "histogram" in stdout
    report = json.loads((out / "calib_report.json").read_text())
    assert report["options"]["act_method"] == 2 and report["options"]["disable_level"] == "L1"
    assert len(report["layers"]) == 14 and set(report["stage_seconds"]) >= {"load", "observe", "export"}
    assert len(report["float_layers"]) >= 1


def test_python_dash_m_entry_point(tmp_path):
    result = subprocess.run([sys.executable, "-m", "calib", "--model_path", "x", "--save_directory",
                             str(tmp_path / "o"), "--calib_file", str(tmp_path / "missing.jsonl")],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2
    assert "missing.jsonl' does not exist" in result.stderr and "Traceback" not in result.stderr


def test_config_defaults_are_cheap_and_valid():
    cfg = CalibConfig(model_path="m", save_directory="o", calib_file="c").validate()
    assert (cfg.num_samples, cfg.max_tokens, cfg.linear_quant_type) == (16, 128, "W8A8")
    w8a16 = CalibConfig(model_path="m", save_directory="o", calib_file="c", a_bit=16)
    assert w8a16.linear_quant_type == "W8A16"


def test_unavailable_devices_exit_2(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    code, _, err = run_cli(capsys, *base_args(tiny_llama_dir, tmp_path / "out"), "--device_type", "cuda")
    assert code == 2 and "--device_type cuda: no CUDA device is available" in err
    monkeypatch.setitem(sys.modules, "torch_npu", None)               # not installed
    code, _, err = run_cli(capsys, *base_args(tiny_llama_dir, tmp_path / "out"), "--device_type", "npu")
    assert code == 2 and "--device_type npu needs torch_npu" in err


def test_msmodelslim_boolean_words_are_accepted():
    from calib.cli import build_parser

    parser = build_parser()
    assert vars(parser.parse_args(["--is_dynamic", "False"]))["is_dynamic"] is False
    assert vars(parser.parse_args(["--is_dynamic", "True"]))["is_dynamic"] is True
    assert vars(parser.parse_args(["--is_dynamic"]))["is_dynamic"] is True
    assert vars(parser.parse_args([]))["is_dynamic"] is None           # not given: recipe decides
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--use_kvcache_quant", "maybe"])
    assert exc.value.code == 2


def test_best_recipe_keeps_every_down_proj_float(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, *base_args(tiny_llama_dir, out), "--recipe", "w8a8_best")
    assert code == 0, err
    description = json.loads((out / "quant_model_description.json").read_text())
    report = json.loads((out / "calib_report.json").read_text())
    down_projs = {f"model.layers.{i}.mlp.down_proj" for i in range(2)}
    assert set(report["float_layers"]) == down_projs
    assert all(why == "--disable_names *.mlp.down_proj" for why in report["float_layers"].values())
    assert {description[f"{n}.weight"] for n in down_projs} == {"FLOAT"}
    assert description["model.layers.0.mlp.gate_proj.weight"] == "W8A8"
    assert report["options"]["anti_method"] == "m3" and description["model_quant_type"] == "W8A8"
