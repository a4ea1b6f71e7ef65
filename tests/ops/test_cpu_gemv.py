"""cpu_gemv: our C++ GEMV against F.linear (fresh random inputs, odd shapes), its selection and
its fallbacks."""
from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ascend_llm.ops import build_op_set, cpu_gemv, cpu_linear_choice

needs_build = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                 reason="no C++ compiler on this machine: the kernel cannot be built")


def _layer(out_features: int, in_features: int, seed: int) -> nn.Module:
    layer = nn.Module()
    layer.weight = nn.Parameter(torch.randn(out_features, in_features,
                                            generator=torch.Generator().manual_seed(seed)), requires_grad=False)
    return layer


@needs_build
def test_builds_here():
    assert cpu_gemv.gemv_unavailable() is None


@needs_build
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 17])
@pytest.mark.parametrize("out_features, in_features", [(37, 50), (1, 16), (96, 576), (33, 1537)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_reference(rows, out_features, in_features, with_bias):
    g = torch.Generator().manual_seed(rows * 1000 + out_features + in_features)
    layer = _layer(out_features, in_features, seed=out_features)
    x = torch.randn(rows, in_features, generator=g)
    bias = torch.randn(out_features, generator=g) if with_bias else None
    want = F.linear(x.double(), layer.weight.double(), None if bias is None else bias.double())
    got = cpu_gemv.linear(layer, x, bias)
    assert got.shape == (rows, out_features) and got.dtype == torch.float32
    # fp32 sums of in_features products: the error is bounded by eps * sum |x| |w| (+ |bias|)
    scale = (x.abs().double() @ layer.weight.abs().double().t()).max().item()
    assert (got.double() - want).abs().max().item() < 4e-6 * scale
    assert scale > 1.0                         # not a comparison of near-zero products


@needs_build
def test_non_contiguous_input_and_threads():
    layer = _layer(64, 128, seed=3)
    x = torch.randn(128, 3).t()                # [3, 128], not contiguous
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            torch.testing.assert_close(cpu_gemv.linear(layer, x, None), F.linear(x, layer.weight), rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(old)


@needs_build
def test_bad_arguments_are_named():
    assert cpu_gemv.gemv_unavailable() is None
    w = torch.randn(8, 16)
    with pytest.raises(RuntimeError, match="columns"):
        torch.ops.ascend_llm_cpu.gemv(torch.randn(1, 15), w, None)
    with pytest.raises(RuntimeError, match="1 to 4 rows"):
        torch.ops.ascend_llm_cpu.gemv(torch.randn(5, 16), w, None)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.ascend_llm_cpu.gemv(torch.randn(1, 16, dtype=torch.float64), w.double(), None)


@needs_build
@pytest.mark.parametrize("vendor, default", [("AuthenticAMD", "cpu.gemv_linear"), ("GenuineIntel", "cpu.linear")])
def test_selected_by_default_for_float32_except_on_intel(monkeypatch, vendor, default):
    """auto: our GEMV, but MKL's on Intel CPUs (faster there); `gemv` forces ours anywhere."""
    monkeypatch.delenv("ASCEND_LLM_CPU_LINEAR", raising=False)
    monkeypatch.setattr(cpu_linear_choice, "cpu_vendor", lambda: vendor)
    ops = build_op_set("cpu")
    assert ops.select("linear", dtype=torch.float32).name == default
    assert ops.select("linear", dtype=torch.float32, shared_weight=True).name == default
    assert ops.select("linear", dtype=torch.bfloat16).name != "cpu.gemv_linear"
    monkeypatch.setenv("ASCEND_LLM_CPU_LINEAR", "gemv")
    assert ops.select("linear", dtype=torch.float32).name == "cpu.gemv_linear"


@pytest.mark.parametrize("choice, want", [("onednn", "cpu.onednn_linear"), ("mkl", "cpu.linear")])
def test_other_choices_step_it_aside(monkeypatch, choice, want):
    monkeypatch.setenv("ASCEND_LLM_CPU_LINEAR", choice)
    if choice == "onednn" and cpu_linear_choice.cpu_vendor() == "" and not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    assert build_op_set("cpu").select("linear", dtype=torch.float32).name == want


def test_a_failed_build_falls_back_to_the_vendor_rule(monkeypatch):
    monkeypatch.delenv("ASCEND_LLM_CPU_LINEAR", raising=False)
    monkeypatch.setattr(cpu_gemv, "gemv_unavailable", lambda: "the CPU GEMV kernel could not be built (test)")
    monkeypatch.setattr(cpu_linear_choice, "cpu_vendor", lambda: "GenuineIntel")
    assert build_op_set("cpu").select("linear", dtype=torch.float32).name == "cpu.linear"

