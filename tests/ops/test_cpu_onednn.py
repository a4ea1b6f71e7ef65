"""oneDNN linear (packed weights) against the F.linear reference."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from ascend_llm.ops import cpu, cpu_linear_choice, cpu_onednn
from ascend_llm.ops.cpu_features import cpu_features

pytestmark = pytest.mark.skipif(cpu_onednn.onednn_unavailable(torch.float32) is not None,
                                reason="oneDNN linear unavailable in this torch build")


class _Layer(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)


@pytest.mark.parametrize("num_tokens", [1, 7, 17, 33, 1025])
@pytest.mark.parametrize("out_features, in_features", [(96, 64), (130, 576), (17, 31)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_onednn_linear_matches_reference_fp32(num_tokens, out_features, in_features, with_bias):
    torch.manual_seed(num_tokens * out_features)
    weight = torch.randn(out_features, in_features)
    x = torch.randn(num_tokens, in_features)
    bias = torch.randn(out_features) if with_bias else None
    want = cpu.linear(_Layer(weight), x, bias)
    layer = _Layer(weight.clone())
    cpu_onednn.prepare_linear(layer)
    got = cpu_onednn.linear(layer, x, bias)
    # fp32 accumulation in a different order: |error| ~ eps * sqrt(k) * |values| (values ~ sqrt(k))
    assert torch.allclose(got, want, atol=2e-4 * in_features ** 0.5 / 24, rtol=1e-5), (got - want).abs().max()


def test_onednn_linear_bf16_close_to_fp32_reference():
    reason = cpu_features().onednn_unavailable(torch.bfloat16)
    if reason is not None:     # an AVX2-only CPU: the kernel steps aside (tests/ops/test_cpu_features.py)
        pytest.skip(reason)
    weight, x = torch.randn(64, 96), torch.randn(9, 96)
    want = cpu.linear(_Layer(weight), x, None)
    layer = _Layer(weight.bfloat16())
    cpu_onednn.prepare_linear(layer)
    got = cpu_onednn.linear(layer, x.bfloat16(), None)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() < 0.1 * want.abs().max() / 8   # bf16 rounding of inputs


@pytest.mark.parametrize("num_tokens", [1, 5, 64])
def test_onednn_dense_linear_matches_reference(num_tokens):
    weight, x, bias = torch.randn(200, 96), torch.randn(num_tokens, 96), torch.randn(200)
    layer = _Layer(weight)
    got = cpu_onednn.dense_linear(layer, x, bias)
    assert torch.allclose(got, cpu.linear(layer, x, bias), atol=1e-4, rtol=1e-5)
    assert layer.weight.data_ptr() == weight.data_ptr()    # nothing re-laid out


def test_kernel_selected_for_fp32_and_can_be_disabled(monkeypatch):
    from ascend_llm.ops import build_op_set
    monkeypatch.setenv("ASCEND_LLM_CPU_LINEAR", "onednn")
    ops = build_op_set("cpu")
    assert ops.select("linear", dtype=torch.float32).name == "cpu.onednn_linear"
    assert ops.select("linear", dtype=torch.float32, shared_weight=True).name == "cpu.onednn_dense_linear"
    assert ops.select("linear", dtype=torch.float16).name == "cpu.linear"
    monkeypatch.setenv("ASCEND_LLM_DISABLE_KERNELS", "cpu.onednn_linear,cpu.onednn_dense_linear")
    assert ops.select("linear", dtype=torch.float32).name == "cpu.linear"


def test_mkl_choice_steps_onednn_aside(monkeypatch):
    from ascend_llm.ops import build_op_set
    monkeypatch.setenv("ASCEND_LLM_CPU_LINEAR", "mkl")
    ops = build_op_set("cpu")
    assert ops.select("linear", dtype=torch.float32).name == "cpu.linear"
    assert ops.select("linear", dtype=torch.float32, shared_weight=True).name == "cpu.linear"


@pytest.mark.parametrize("vendor, want", [("GenuineIntel", "cpu.linear"), ("AuthenticAMD", "cpu.onednn_linear"),
                                          ("", "cpu.onednn_linear")])
def test_auto_choice_follows_cpu_vendor(monkeypatch, vendor, want):
    # the vendor rule decides where our GEMV (ops/cpu_gemv.py, preferred under auto) cannot run
    from ascend_llm.ops import build_op_set, cpu_gemv
    monkeypatch.setenv("ASCEND_LLM_CPU_LINEAR", "auto")
    monkeypatch.setattr(cpu_gemv, "gemv_unavailable", lambda: "not built (test)")
    monkeypatch.setattr(cpu_linear_choice, "cpu_vendor", lambda: vendor)
    assert build_op_set("cpu").select("linear", dtype=torch.float32).name == want


def test_bad_choice_is_named(monkeypatch):
    monkeypatch.setenv("ASCEND_LLM_CPU_LINEAR", "fastest")
    with pytest.raises(ValueError, match="ASCEND_LLM_CPU_LINEAR='fastest'"):
        cpu_linear_choice.onednn_preferred()


def test_cpu_vendor_reads_proc_cpuinfo():
    vendor = cpu_linear_choice.cpu_vendor()
    assert isinstance(vendor, str)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        assert vendor and vendor in cpuinfo.read_text()
