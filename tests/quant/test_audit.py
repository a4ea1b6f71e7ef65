"""The per-layer quantization audit and strict mode (`quant/audit.py`), on peer-written fixtures:
which kernel each layer runs on this backend, how it computes, its layout and bytes; strict mode
refuses quantized layers off their native kernel, naming them.

Paths: "native" = low-bit arithmetic or the backend's quantized op (CPU int8 GEMM, NPU
npu_quant_matmul / npu_weight_quant_batchmatmul), "dequantize" = the weights decoded to float and a
float matmul (every CPU weight-only / fp8 kernel), "reference" = a backend's plain-torch fallback.
"""
from __future__ import annotations

import json

import pytest
import torch

from ascend_llm import LLM
from ascend_llm.cli import main
from ascend_llm.ops import build_op_set
from ascend_llm.ops.cpu_int8_gemm import int8_gemm_unavailable
from ascend_llm.quant.audit import audit_model, check_strict, strict_violations, summary_line
from tests.ops.npu_emulation import npu_emulation  # noqa: F401  (fixture)
from tests.quant.peer_fixtures import ROOT, build

LINEARS_PER_LAYER = 4          # qkv, o, gate_up, down (fused as the runtime builds them)


def test_w8a8_on_cpu_runs_the_int8_gemm_where_it_is_exact():
    _, model = build("msmodelslim/llama_w8a8", build_op_set("cpu"), torch.float32)
    audits = audit_model(model)
    quantized = [a for a in audits if a.quantized]
    assert len(quantized) == 2 * LINEARS_PER_LAYER and all(a.scheme == "W8A8 static" for a in quantized)
    # where the CPU has no exact int8 dot product the float64 reference runs (tests/ops/test_cpu_int8_gemm.py)
    native = int8_gemm_unavailable() is None
    matmul = "cpu.int8_quant_matmul" if native else "cpu.quant_matmul"
    assert all(a.path == ("native" if native else "reference") for a in quantized)
    assert {c.kernel.name for a in quantized for c in a.kernels} == {"cpu.quantize_per_tensor", matmul}
    qkv = quantized[0]
    assert qkv.prefix == "model.layers.0.self_attn.qkv_proj" and qkv.layout == "int8 [128, 64]"
    assert qkv.nbytes == sum(t.numel() * t.element_size() for t in
                             list(model.model.layers[0].self_attn.qkv_proj.parameters(recurse=False))
                             + list(model.model.layers[0].self_attn.qkv_proj.buffers(recurse=False)))
    assert summary_line(audits).startswith(f"9 layers: 8 W8A8 static -> cpu.quantize_per_tensor, {matmul}, 1 FLOAT")
    assert (strict_violations(audits) == []) == native


def test_w8a8_on_the_float64_reference_is_reported_by_strict_mode(monkeypatch):
    monkeypatch.setenv("ASCEND_LLM_DISABLE_KERNELS", "cpu.int8_quant_matmul")
    _, model = build("msmodelslim/llama_w8a8", build_op_set("cpu"), torch.float32)
    quantized = [a for a in audit_model(model) if a.quantized]
    # the exact float64 emulation of the int8 matmul is the reference, not an int8 kernel
    assert all(a.path == "reference" for a in quantized)
    assert quantized[0].to_dict()["kernels"][1]["rejected"] == [
        "cpu.int8_quant_matmul: disabled by ASCEND_LLM_DISABLE_KERNELS"]
    assert_strict_names_every_layer(quantized, "model.layers.0.self_attn.qkv_proj [W8A8 static]: quant_matmul "
                                               "runs cpu.quant_matmul (reference)")


def test_strict_mode_names_layers_that_dequantize_on_cpu():
    _, model = build("msmodelslim/llama_w4a16_g32", build_op_set("cpu"), torch.float32)
    audits = audit_model(model)
    assert {a.scheme for a in audits if a.quantized} == {"W4A16 g32"}
    assert_strict_names_every_layer(audits, "model.layers.0.self_attn.qkv_proj [W4A16 g32]: "
                                            "weight_only_group_matmul runs cpu.weight_only_group_matmul (dequantize)")


def assert_strict_names_every_layer(audits, first_line: str) -> None:
    """Strict mode lists all 8 quantized Linears of the tiny llama (first line given) and refuses."""
    lines = strict_violations(audits)
    assert len(lines) == 2 * LINEARS_PER_LAYER
    assert lines[0] == first_line
    with pytest.raises(ValueError, match=r"--quantization-strict: 8 quantized layer\(s\)"):
        check_strict(audits)


def test_npu_audit_shows_nz_weights_and_a_forced_fallback_fails_strict(npu_emulation, monkeypatch):
    _, model = build("msmodelslim/llama_w8a8", build_op_set("npu"), torch.float16)
    audits = [a for a in audit_model(model) if a.quantized]
    assert all(a.layout.endswith("FRACTAL_NZ") and a.path == "native" for a in audits), audits[0]
    assert audits[0].kernel_names == "npu.w8a8_static" and audits[0].layout == "int8 [64, 128] FRACTAL_NZ"
    # the group-wise weight-only kernel disabled: its layers step aside to the torch reference
    monkeypatch.setenv("ASCEND_LLM_DISABLE_KERNELS", "npu.weight_quant_batchmatmul_group")
    _, model = build("msmodelslim/llama_w4a16_g32", build_op_set("npu"), torch.float16)
    audit = audit_model(model)[0]
    assert audit.path == "reference"
    assert audit.to_dict()["kernels"][0]["rejected"] == [
        "npu.weight_quant_batchmatmul_group: disabled by ASCEND_LLM_DISABLE_KERNELS"]
    with pytest.raises(ValueError) as err:
        check_strict(audit_model(model))
    assert ("model.layers.1.mlp.down_proj [W4A16 g32]: weight_only_group_matmul runs "
            "npu.torch_reference.weight_only_group_matmul (reference)") in str(err.value)


def test_llm_quantization_strict_refuses_at_load(tiny_llama_dir):
    model_dir = ROOT / "llmcompressor" / "llama_fp8_dynamic"
    kwargs = dict(tokenizer=str(tiny_llama_dir), device="cpu", max_model_len=32, enforce_eager=True,
                  kv_cache_memory_gb=0.01)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.qkv_proj \[FP8 per-channel dynamic\]"):
        LLM(str(model_dir), quantization_strict=True, **kwargs)
    w8a8 = str(ROOT / "msmodelslim" / "llama_w8a8")
    if int8_gemm_unavailable() is None:      # the int8 GEMM runs here: strict mode accepts W8A8
        llm = LLM(w8a8, quantization_strict=True, **kwargs)
        assert "8 W8A8 static -> cpu.quantize_per_tensor, cpu.int8_quant_matmul" in \
            summary_line(llm.llm_engine.quantization_audit())
    else:
        with pytest.raises(ValueError, match=r"qkv_proj \[W8A8 static\]: quant_matmul runs cpu\.quant_matmul"):
            LLM(w8a8, quantization_strict=True, **kwargs)


def test_inspect_prints_the_audit_without_a_server(tiny_llama_dir, capsys):
    model_dir = ROOT / "msmodelslim" / "llama_w8a16_g32"
    assert main(["--log-level", "WARNING", "inspect", str(model_dir), "--tokenizer", str(tiny_llama_dir),
                 "--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["backend"] == "cpu" and report["summary"].startswith("9 layers: 8 W8A16 g32")
    down = next(layer for layer in report["layers"] if layer["layer"] == "model.layers.0.mlp.down_proj")
    assert down["path"] == "dequantize" and down["kernels"][0]["kernel"] == "cpu.weight_only_group_matmul"
    assert len(report["not_native"]) == 8
    assert main(["--log-level", "WARNING", "inspect", str(model_dir), "--tokenizer", str(tiny_llama_dir),
                 "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].split() == ["layer", "scheme", "path", "kernels", "weight", "layout", "bytes"]
    assert "cpu: 9 layers: 8 W8A16 g32 -> cpu.weight_only_group_matmul" in text
