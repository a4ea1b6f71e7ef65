"""benchmarks/bench_cuda.py without a GPU: a clear exit message, and the decode-limit bytes."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[3] / "benchmarks" / "bench_cuda.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_cuda", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_exits_with_a_clear_message_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        _bench().require_cuda()


def test_weight_bytes_of_llama2_7b() -> None:
    bench = _bench()
    linear = 32 * (4 * 4096 ** 2 + 3 * 4096 * 11008)                 # 6.48e9 parameters
    assert linear == 6_476_005_376
    bf16, wint8, wint4 = (bench.weight_bytes(m) for m in (None, "wint8", "wint4"))
    # 6.74e9 parameters = 13.5 GB, but a step reads one embedding row, not the 262 MB table
    assert bf16 == 2 * linear + 2 * 32000 * 4096 + 2 * 4096 + 2 * 4096 * 65
    assert wint8 - linear == pytest.approx(bf16 - 2 * linear + 4 * 32 * (4 * 4096 + 3 * 11008))
    assert wint4 < wint8 < bf16


def test_tables_show_failed_rows_and_results_are_saved(tmp_path, capsys) -> None:
    bench = _bench()
    result = {"gpu": "Test GPU", "copy_bandwidth_gb_s": 3000.0,
              "gemm": [{"kernel": "bf16 cuBLAS", "m": 4096, "n": 4096, "k": 4096, "tflops": 650.0, "x_bf16": 1.0,
                        "fraction_of_spec_peak": 0.66},
                       {"kernel": "fp8 block 128x128 Triton", "m": 4096, "n": 4096, "k": 4096,
                        "error": "RuntimeError('out of resources')"}],
              "memory_bound": [{"kernel": "rms_norm 1x4096", "error": "RuntimeError('x')"},
                               {"kernel": "wint4 GEMV Triton 4096x4096", "seconds": 4e-6, "gb_s": 2200.0,
                                "fraction_of_copy_bw": 0.73}],
              "decode": [{"method": "HF transformers bf16", "decode_tok_s": 15.0, "limit_tok_s": 222.0},
                         {"method": "ascend-llm wint4", "decode_tok_s": 470.0, "limit_tok_s": 800.0, "x_hf": 31.3},
                         {"method": "ascend-llm wint8", "error": "ValueError('y')"}]}
    bench.print_tables(result)
    printed = capsys.readouterr().out
    assert "fp8 block 128x128 Triton" in printed and "error: RuntimeError('out of resources')" in printed
    assert "rms_norm 1x4096" in printed and "ascend-llm wint8" in printed
    assert "2200" in printed and "0.73" in printed                     # the good rows' cells
    assert "470.0    800.0     0.59  31.30" in printed
    bench.save_result(result, tmp_path / "sub" / "r.json")
    assert json.loads((tmp_path / "sub" / "r.json").read_text()) == result


def test_offline_rows_keep_going_after_a_failed_config(monkeypatch, capsys) -> None:
    bench = _bench()

    def fake_offline(model_dir, method, kv_cache_dtype, num_requests, prompt_len, output_len):
        if kv_cache_dtype == "int8":
            raise RuntimeError("no int8 cache here")
        blocks = 2000 if kv_cache_dtype == "fp8" else 1000
        return {"seconds": 10.0, "output_tok_s": 3200.0, "total_tok_s": 16000.0, "num_kv_blocks": blocks,
                "block_size": 16, "weights_gib": 12.6, "peak_allocated_gib": 66.0}
    monkeypatch.setattr(bench, "ours_offline", fake_offline)
    rows, saves = [], []
    bench.offline_rows(Path("unused"), 40.0, 256, 512, 128, rows, lambda: saves.append(len(rows)))
    assert [r["config"] for r in rows] == [c[0] for c in bench.OFFLINE_CONFIGS]
    assert saves == list(range(1, len(rows) + 1))                 # saved after every row
    int8 = next(r for r in rows if r["config"] == "bf16, int8 KV cache")
    assert int8["error"] == "RuntimeError('no int8 cache here')"
    assert rows[0]["x_hf_batch1"] == pytest.approx(80.0)
    bench.print_tables({"gpu": "Test GPU", "copy_bandwidth_gb_s": 3000.0, "gemm": [], "memory_bound": [],
                        "offline": rows})
    printed = capsys.readouterr().out
    assert "offline (256 x 512+128)" in printed and "no int8 cache here" in printed and "2000" in printed


def test_bench_cuda_methods_and_w8a8_weight_bytes():
    bench = _bench()
    assert bench.parse_methods("bf16, w8a8,w8a8_dynamic") == [None, "w8a8", "w8a8_dynamic"]
    with pytest.raises(SystemExit, match=r"unknown \['w4a4'\]"):
        bench.parse_methods("bf16,w4a4")
    bf16, w8a8, dynamic, wint8 = (bench.weight_bytes(m) for m in (None, "w8a8", "w8a8_dynamic", "wint8"))
    out_channels = 32 * (4 * 4096 + 3 * 11008)
    assert w8a8 - dynamic == 4 * out_channels and dynamic == wint8 and w8a8 < bf16
