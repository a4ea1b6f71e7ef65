"""ops/cpu_bf16.py: the bf16 linear of CPUs without oneDNN bf16, against a float64 reference
rounded once to bf16, and when it is selected."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from ascend_llm.ops import build_op_set, build_registry, cpu_bf16
from ascend_llm.ops.cpu_features import ENV_VAR, cpu_features

BF16_UNIT_ROUNDOFF = 2.0 ** -8
FP32_UNIT_ROUNDOFF = 2.0 ** -24


def _layer(weight: torch.Tensor) -> nn.Module:
    layer = nn.Module()
    layer.weight = nn.Parameter(weight, requires_grad=False)
    return layer


@pytest.mark.parametrize("rows", [1, 4, cpu_bf16.UPCAST_MIN_ROWS - 1, cpu_bf16.UPCAST_MIN_ROWS, 33])
@pytest.mark.parametrize("out_features, in_features", [(96, 64), (17, 577)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_rounds_the_fp32_sum_once(rows, out_features, in_features, with_bias):
    g = torch.Generator().manual_seed(rows * 7 + in_features)
    weight = torch.randn(out_features, in_features, generator=g).bfloat16()
    x = torch.randn(rows, in_features, generator=g).bfloat16()
    bias = torch.randn(out_features, generator=g).bfloat16() if with_bias else None
    got = cpu_bf16.linear(_layer(weight), x, bias)
    assert got.shape == (rows, out_features) and got.dtype == torch.bfloat16
    exact = x.double() @ weight.double().t() + (0 if bias is None else bias.double())
    # one bf16 rounding of the result, plus fp32 accumulation error over in_features products
    magnitude = x.double().abs() @ weight.double().abs().t() + (0 if bias is None else bias.double().abs())
    bound = BF16_UNIT_ROUNDOFF * exact.abs() + in_features * FP32_UNIT_ROUNDOFF * magnitude
    assert ((got.double() - exact).abs() <= bound).all(), ((got.double() - exact).abs() - bound).max()


def test_selected_only_where_onednn_has_no_bf16(monkeypatch):
    monkeypatch.setenv("ASCEND_LLM_CPU_LINEAR", "onednn")       # so the CPU, not the vendor, decides
    monkeypatch.setenv(ENV_VAR, "avx2")
    ops = build_op_set("cpu")
    assert ops.select("linear", dtype=torch.bfloat16).name == "cpu.bf16_linear"
    assert ops.select("linear", dtype=torch.float32).name == "cpu.onednn_linear"
    kernel = next(k for k in build_registry().kernels[("linear", "cpu")] if k.name == "cpu.bf16_linear")
    assert kernel.supports(dtype=torch.float32) == "dtype torch.float32 is not bfloat16"
    monkeypatch.setenv(ENV_VAR, "native")
    if cpu_features().onednn_unavailable(torch.bfloat16) is None:           # this host runs oneDNN bf16
        assert kernel.supports(dtype=torch.bfloat16) == "oneDNN runs bfloat16 linear on this CPU"
        assert ops.select("linear", dtype=torch.bfloat16).name == "cpu.onednn_linear"
    else:
        assert ops.select("linear", dtype=torch.bfloat16).name == "cpu.bf16_linear"
