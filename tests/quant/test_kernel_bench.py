"""`ascend-llm inspect --bench` (`quant/kernel_bench.py`): per layer shape, the bound kernels
timed against the float kernel. No test asserts a wall time: the arithmetic (flags, ratios, the
decode speed-up) runs on a fake clock that the monkeypatched layer methods advance by a cost of
our choosing; one real run checks the JSON's structure only.
"""
from __future__ import annotations

import json

import pytest
import torch

from ascend_llm.cli import main
from ascend_llm.ops import build_op_set
from ascend_llm.ops.cpu_int8_gemm import int8_gemm_unavailable
from ascend_llm.quant.audit import audit_model, audit_report
from ascend_llm.quant.kernel_bench import TimerSettings, bench_model, seconds_per_call
from ascend_llm.quant.unquantized import UnquantizedLinearMethod
from ascend_llm.quant.w8a8 import W8A8StaticLinearMethod
from tests.ops.npu_emulation import npu_emulation  # noqa: F401  (fixture)
from tests.quant.peer_fixtures import ROOT, build
from tests.quant.test_moe_checkpoints import build as build_moe
from tests.tiny_models import make_tiny_moe_model_dir

FLOAT_US = 20.0


class FakeClock:
    """Seconds that pass only when a patched kernel says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance_us(self, us: float) -> None:
        self.now += us * 1e-6


def quant_cost_us(out_features: int, rows: int) -> float:
    """The fake cost of the W8A8 layers of the tiny llama: qkv (out 128) slower than float at any
    batch, gate_up (out 192) cheap at one row but slower at 4, o / down (out 64) always faster."""
    if out_features == 128:
        return 30.0
    if out_features == 192:
        return 10.0 * rows - 5.0
    return 10.0


@pytest.fixture
def fake_costs(monkeypatch):
    clock = FakeClock()
    float_apply, quant_apply = UnquantizedLinearMethod.apply, W8A8StaticLinearMethod.apply

    def slow_float(self, layer, x, bias=None):
        clock.advance_us(FLOAT_US)
        return float_apply(self, layer, x, bias)

    def slow_quant(self, layer, x, bias=None):
        clock.advance_us(quant_cost_us(sum(layer.output_sizes), x.shape[0]))
        return quant_apply(self, layer, x, bias)

    monkeypatch.setattr(UnquantizedLinearMethod, "apply", slow_float)
    monkeypatch.setattr(W8A8StaticLinearMethod, "apply", slow_quant)
    return clock


def test_timer_takes_the_median_per_call_after_warm_up():
    clock = FakeClock()
    # 3 warm-up calls (not counted), 1 sizing call, then 3 blocks of 4 calls (max_calls caps them)
    costs = iter([500.0] * 3 + [100.0] + [100.0] * 4 + [900.0] * 4 + [300.0] * 4)
    seconds = seconds_per_call(lambda: clock.advance_us(next(costs)), torch.device("cpu"), clock,
                               TimerSettings(warmup=3, repeat=3, block_seconds=1.0, max_calls=4))
    assert seconds * 1e6 == pytest.approx(300.0)
    assert next(costs, None) is None                              # exactly 3 + 1 + 12 calls


def test_slower_shapes_are_flagged_and_the_speedup_is_summed_over_layers(fake_costs):
    _, model = build("msmodelslim/llama_w8a8", build_op_set("cpu"), torch.float32)
    bench = bench_model(model, torch.float32, "cpu", (1, 4), clock=fake_costs,
                        settings=TimerSettings(warmup=1, repeat=3, max_calls=2))
    by_out = {(s.key.scheme, s.key.out_features): s for s in bench.shapes}
    qkv, gate_up = by_out[("W8A8 static", 128)], by_out[("W8A8 static", 192)]
    assert qkv.layers == ["model.layers.0.self_attn.qkv_proj", "model.layers.1.self_attn.qkv_proj"]
    assert qkv.ratio(1) == pytest.approx(1.5) and qkv.slower(1) and qkv.slower(4)
    assert gate_up.ratio(1) == pytest.approx(0.25) and not gate_up.slower(1)
    assert gate_up.ratio(4) == pytest.approx(1.75) and gate_up.slower(4)
    lm_head = by_out[("FLOAT", 128)]
    assert lm_head.layers == ["lm_head"] and lm_head.ratio(1) == 1.0 and not lm_head.slower(1)
    assert bench.slower_layers(1) == qkv.layers
    assert bench.slower_layers(4) == qkv.layers + gate_up.layers
    # 9 layers at 20 us float; quantized: qkv 2x30, o 2x10, gate_up 2x(10*rows-5), down 2x10, lm_head 20
    assert bench.speedup(1) == pytest.approx(180 / (60 + 20 + 10 + 20 + 20))
    assert bench.speedup(4) == pytest.approx(180 / (60 + 20 + 70 + 20 + 20))
    text = bench.table()
    assert text.count("SLOWER") == 3 and "0.95x at batch 4" in text.splitlines()[-3]


def test_bench_json_rides_in_the_audit_report(fake_costs):
    _, model = build("msmodelslim/llama_w8a8", build_op_set("cpu"), torch.float32)
    bench = bench_model(model, torch.float32, "cpu", (1,), clock=fake_costs,
                        settings=TimerSettings(warmup=1, repeat=3, max_calls=2)).to_dict()
    report = json.loads(json.dumps(audit_report(audit_model(model), "cpu", bench)))
    assert set(report) == {"backend", "summary", "not_native", "layers", "bench"}
    data = report["bench"]
    assert data["batch_sizes"] == [1] and data["dtype"] == "float32" and data["skipped"] == []
    assert data["slower_layers"] == {"1": ["model.layers.0.self_attn.qkv_proj", "model.layers.1.self_attn.qkv_proj"]}
    qkv = next(s for s in data["shapes"] if s["out_features"] == 128 and s["scheme"] != "FLOAT")
    native = int8_gemm_unavailable() is None         # the int8 GEMM, or the float64 reference without VNNI
    matmul = "cpu.int8_quant_matmul" if native else "cpu.quant_matmul"
    assert qkv == {"scheme": "W8A8 static", "kernels": f"cpu.quantize_per_tensor, {matmul}",
                   "path": "native" if native else "reference", "float_kernel": qkv["float_kernel"],
                   "in_features": 64, "out_features": 128,
                   "bias": False, "num_layers": 2, "layers": qkv["layers"], "quant_us": {"1": 30.0},
                   "float_us": {"1": 20.0}, "ratio": {"1": 1.5}, "slower": {"1": True}}
    assert qkv["float_kernel"].startswith("cpu.")          # what the registry binds for a float Linear
    assert "bench" not in audit_report(audit_model(model), "cpu")


def test_inspect_bench_real_run_structure(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    model_dir = ROOT / "msmodelslim" / "llama_w8a8"
    args = ["--log-level", "WARNING", "inspect", str(model_dir), "--tokenizer", str(tiny_llama_dir),
            "--device", "cpu", "--bench-batch-sizes", "1,3", "--bench-output", str(out), "--bench-note", "ci"]
    assert main(args + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == report
    bench = report["bench"]
    assert bench["batch_sizes"] == [1, 3] and bench["host"]["note"] == "ci"
    assert sum(s["num_layers"] for s in bench["shapes"]) == len(report["layers"]) == 9
    for shape in bench["shapes"]:
        assert set(shape["quant_us"]) == set(shape["ratio"]) == {"1", "3"}
        assert all(v > 0 for v in [*shape["quant_us"].values(), *shape["float_us"].values()])
    assert set(bench["speedup"]) == {"1", "3"}
    assert main(args[:-4] + ["--bench"]) == 0                                # the table, no file
    text = capsys.readouterr().out
    assert "quant us@1" in text and "expected decode speed-up over float32 on cpu (9 layers)" in text


def test_inspect_rejects_bad_batch_sizes_and_output_paths(tmp_path, capsys, caplog):
    for value in ("0,16", "1,x", "4,4"):
        with pytest.raises(SystemExit):
            main(["inspect", "m", "--bench", "--bench-batch-sizes", value])
        assert "--bench-batch-sizes" in capsys.readouterr().err
    missing = tmp_path / "no" / "bench.json"
    assert main(["inspect", "m", "--bench-output", str(missing)]) == 2       # before loading anything
    assert f"--bench-output {missing}: the directory does not exist" in caplog.text


def test_bench_on_the_emulated_npu_binds_the_npu_kernels(npu_emulation):
    """Same code on another backend: the NPU W8A8 kernel against the NPU float linear, synchronized
    through torch.npu (the emulation's); structure only, no timing asserted."""
    _, model = build("msmodelslim/llama_w8a8", build_op_set("npu"), torch.float16)
    bench = bench_model(model, torch.float16, "npu", (1,), settings=TimerSettings(warmup=1, repeat=1, max_calls=1))
    quantized = [s for s in bench.shapes if s.quantized]
    assert {s.key.kernels for s in quantized} == {"npu.w8a8_static"}
    assert all(s.float_kernel.startswith("npu.") for s in quantized), quantized[0].float_kernel
    assert sum(len(s.layers) for s in bench.shapes) == 9 and bench.to_dict()["dtype"] == "float16"


def test_moe_experts_are_listed_as_not_timed(tmp_path):
    src = make_tiny_moe_model_dir(tmp_path, "qwen3_moe")
    _, model = build_moe(src)
    bench = bench_model(model, torch.float32, "cpu", (1,), settings=TimerSettings(warmup=1, repeat=1, max_calls=1))
    experts = [getattr(m, "prefix", n) or n for n, m in model.named_modules() if getattr(m, "is_fused_moe", False)]
    assert experts and bench.skipped == experts
    assert f"not timed (no linear shape, e.g. MoE experts): {len(experts)} layer(s)" in bench.table()
    assert bench.shapes and all(not s.quantized for s in bench.shapes)


def test_a_rotated_layer_is_timed_with_its_online_hadamard(fake_costs, tiny_llama_dir, tmp_path, monkeypatch):
    """The quantized time of a down_proj with `online_hadamard` includes the rotation (the layer's
    apply_method), while its float twin stays unrotated."""
    from ascend_llm.layers import linear as linear_module
    from tests.quant.hadamard_writer import write_rotated_checkpoint
    from tests.quant.peer_fixtures import build_dir

    out = write_rotated_checkpoint(tiny_llama_dir, tmp_path / "rot", 32)
    _, model = build_dir(out, build_op_set("cpu"), torch.float32)
    down = dict(model.named_modules())["model.layers.0.mlp.down_proj"]
    assert down.input_hadamard_block == 32
    rotate = down._input_transform

    def slow_rotate(x, block):
        fake_costs.advance_us(7.0)
        return rotate(x, block)

    for module in model.modules():
        if isinstance(module, linear_module.LinearBase) and module.input_hadamard_block is not None:
            monkeypatch.setattr(module, "_input_transform", slow_rotate)
    bench = bench_model(model, torch.float32, "cpu", (1,), clock=fake_costs,
                        settings=TimerSettings(warmup=1, repeat=3, max_calls=2))
    shape = next(s for s in bench.shapes if "model.layers.0.mlp.down_proj" in s.layers)
    assert shape.float_us[1] == pytest.approx(FLOAT_US)
    assert shape.quant_us[1] == pytest.approx(quant_cost_us(64, 1) + 7.0)
