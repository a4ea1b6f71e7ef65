"""`python -m calib --speed_aware PATH`: the layers `ascend-llm inspect --bench` measured slower than
float stay FLOAT in the written checkpoint, with the measured ratio as the reason; bad tables are
clear errors. The table is built with the runtime's own producer (`KernelBench.to_dict` inside
`audit_report`) from chosen timings: no test here times anything."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ascend_llm.ops.cpu_int8_gemm import int8_gemm_unavailable
from ascend_llm.quant.audit import audit_report
from ascend_llm.quant.kernel_bench import KernelBench, ShapeBench, ShapeKey, TimerSettings
from ascend_llm.quant.unquantized import UnquantizedLinearMethod
from ascend_llm.quant.w8a8 import W8A8StaticLinearMethod
from calib.cli import main
from calib.config import CalibError, build_config
from calib.pipeline import run_calibration
from calib.speed_aware import read_speed_table
from tests.calib.test_cli import CALIB_FILE, base_args, run_cli
from tests.quant.test_kernel_bench import FakeClock

W8A8 = "W8A8 static"
KERNELS = "cpu.quantize_per_tensor, cpu.int8_quant_matmul"
# what a real W8A8 load binds here: the int8 GEMM, or the float64 reference on a CPU without VNNI
BOUND_KERNELS = ("cpu.quantize_per_tensor, "
                 + ("cpu.int8_quant_matmul" if int8_gemm_unavailable() is None else "cpu.quant_matmul"))


def shape(layers: list[str], quant_us: dict[int, float], float_us: dict[int, float]) -> ShapeBench:
    return ShapeBench(ShapeKey(W8A8, KERNELS, "native", 64, 128, False), layers, "cpu.gemv_linear",
                      quant_us, float_us)


def speed_table(path: Path) -> Path:
    """qkv of layer 0 slower than float at batch 1 (30 vs 20 us), gate_up of layer 1 at batch 16 only."""
    bench = KernelBench("cpu", torch.float32, (1, 16), [
        shape(["model.layers.0.self_attn.qkv_proj"], {1: 30.0, 16: 10.0}, {1: 20.0, 16: 20.0}),
        shape(["model.layers.1.mlp.gate_up_proj"], {1: 10.0, 16: 50.0}, {1: 20.0, 16: 20.0}),
        shape(["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"], {1: 5.0, 16: 5.0},
              {1: 20.0, 16: 20.0}),
    ], [], TimerSettings())
    path.write_text(json.dumps(audit_report([], "cpu", bench.to_dict())))
    return path


def calibrate(capsys, model_dir, out: Path, *flags: str) -> tuple[dict, dict]:
    code, _, err = run_cli(capsys, *base_args(model_dir, out), "--a_bit", "8", *flags)
    assert code == 0, err
    return (json.loads((out / "quant_model_description.json").read_text()),
            json.loads((out / "calib_report.json").read_text()))


def test_layers_measured_slower_stay_float_with_the_ratio_as_reason(tiny_llama_dir, tmp_path, capsys):
    table = speed_table(tmp_path / "bench.json")
    description, report = calibrate(capsys, tiny_llama_dir, tmp_path / "b1", "--speed_aware", str(table))
    qkv = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    assert set(report["float_layers"]) == set(qkv)
    assert report["float_layers"][qkv[0]] == (
        f"--speed_aware: {W8A8} ({KERNELS}) measured 30.0 us vs float 20.0 us at batch 1 on cpu (ratio 1.50)")
    assert {description[f"{n}.weight"] for n in qkv} == {"FLOAT"}
    assert description["model.layers.1.mlp.gate_proj.weight"] == "W8A8"
    # at 16 rows the other shape decides, and --disable_level ranks the remaining layers only
    description, report = calibrate(capsys, tiny_llama_dir, tmp_path / "b16", "--speed_aware", str(table),
                                    "--speed_aware_batch", "16", "--disable_level", "L1")
    gate_up = ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    speed = {n for n, why in report["float_layers"].items() if why.startswith("--speed_aware")}
    assert speed == set(gate_up) and "ratio 2.50" in report["float_layers"][gate_up[0]]
    assert len(report["float_layers"]) > len(gate_up)                  # plus the most sensitive one
    assert {description[f"{n}.weight"] for n in gate_up} == {"FLOAT"}


def test_speed_aware_auto_times_the_planned_layers_before_calibrating(tiny_llama_dir, tmp_path, monkeypatch):
    """auto writes the float model as W8A8 to a temporary checkpoint, loads it with the runtime and
    times it; here on a fake clock: qkv layers 30 us, the other W8A8 layers 10 us, float 20 us."""
    clock = FakeClock()
    float_apply, quant_apply = UnquantizedLinearMethod.apply, W8A8StaticLinearMethod.apply

    def slow_float(self, layer, x, bias=None):
        clock.advance_us(20.0)
        return float_apply(self, layer, x, bias)

    def slow_quant(self, layer, x, bias=None):
        clock.advance_us(30.0 if layer.prefix.endswith("qkv_proj") else 10.0)
        return quant_apply(self, layer, x, bias)

    monkeypatch.setattr(UnquantizedLinearMethod, "apply", slow_float)
    monkeypatch.setattr(W8A8StaticLinearMethod, "apply", slow_quant)
    out = tmp_path / "auto"
    cfg = build_config({"model_path": str(tiny_llama_dir), "save_directory": str(out), "calib_file": CALIB_FILE,
                        "num_samples": 2, "max_tokens": 32, "progress": False, "speed_aware": "auto"})
    report = run_calibration(cfg, speed_clock=clock)
    qkv = {f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkv"}
    assert set(report.float_layers) == qkv and "speed_aware" in report.stage_seconds
    assert report.float_layers["model.layers.1.self_attn.v_proj"] == (
        f"--speed_aware: {W8A8} ({BOUND_KERNELS}) measured 30.0 us vs float 20.0 us at batch 1 on cpu (ratio 1.50)")
    description = json.loads((out / "quant_model_description.json").read_text())
    assert {description[f"{n}.weight"] for n in qkv} == {"FLOAT"}
    assert description["model.layers.1.mlp.down_proj.weight"] == "W8A8"


def write(path: Path, data) -> str:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


GOOD_SHAPE = {"scheme": W8A8, "layers": ["a.qkv_proj"], "quant_us": {"1": 2.0}, "float_us": {"1": 1.0},
              "slower": {"1": True}}


@pytest.mark.parametrize("content,message", [
    ("{not json", r"bad\.json: not valid JSON"),
    ({"backend": "cpu", "layers": []}, r"no 'bench' table in the file; write one with `ascend-llm inspect"),
    ({"bench": {"batch_sizes": [16], "shapes": []}}, r"--speed_aware_batch 1: .* batch sizes \[16\] only"),
    ({"bench": {"batch_sizes": [1], "shapes": {}}}, r"bench\.shapes must be a list"),
    ({"bench": {"batch_sizes": [1], "shapes": [{**GOOD_SHAPE, "float_us": {}}]}},
     r"bench\.shapes\[0\]: 'float_us' has no entry for batch 1"),
    ({"bench": {"batch_sizes": [1], "shapes": [{**GOOD_SHAPE, "quant_us": {"1": "fast"}}]}},
     r"bench\.shapes\[0\]: quant_us / float_us at batch 1 must be positive numbers"),
    ({"bench": {"batch_sizes": [1], "shapes": [{**GOOD_SHAPE, "slower": {"1": "yes"}}]}},
     r"'slower' at batch 1 must be true or false"),
    ({"bench": {"batch_sizes": [1], "shapes": [{**GOOD_SHAPE, "layers": "a.qkv_proj"}]}},
     r"'layers' must be a list of layer names"),
])
def test_malformed_tables_are_named(tmp_path, content, message):
    with pytest.raises(CalibError, match=message):
        read_speed_table(write(tmp_path / "bad.json", content), 1)


def test_bad_speed_aware_inputs_exit_2(tiny_llama_dir, tmp_path, capsys):
    missing = tmp_path / "missing.json"
    code, _, err = run_cli(capsys, *base_args(tiny_llama_dir, tmp_path / "o1"), "--speed_aware", str(missing))
    assert code == 2 and f"--speed_aware {missing}: cannot read the file" in err
    other = write(tmp_path / "other.json", {"bench": {"batch_sizes": [1], "shapes": [
        {**GOOD_SHAPE, "layers": ["model.layers.7.self_attn.qkv_proj"]}]}})
    code, _, err = run_cli(capsys, *base_args(tiny_llama_dir, tmp_path / "o2"), "--speed_aware", other)
    assert code == 2 and "'model.layers.7.self_attn.qkv_proj' is not a decoder Linear of this model" in err
    code, _, err = run_cli(capsys, *base_args(tiny_llama_dir, tmp_path / "o4"), "--speed_aware", other,
                           "--a_bit", "16", "--w_bit", "4")
    assert code == 2 and "--speed_aware: implemented for W8A8" in err
    assert main(base_args(tiny_llama_dir, tmp_path / "o5") + ["--speed_aware", other,
                                                              "--speed_aware_batch", "0"]) == 2
