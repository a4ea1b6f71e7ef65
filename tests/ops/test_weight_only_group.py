"""Group-wise weight-only int4 / int8 (`weight_only_group_matmul`, compressed-tensors W4A16 / W8A16):
the CPU reference against the format's element-wise definition, and the NPU kernel
(npu_weight_quant_batchmatmul with antiquant_group_size, through the emulated torch_npu) against the
CPU reference, on fresh random layers. k = 198 is a multiple of neither 8 nor 4 (the int4 / int8
values per int32 of the checkpoint) and leaves every group size a short last group.

Tolerances, as a fraction of the output range max |y|:
- CPU reference vs the float64 definition: fp32 sums in another order, 1e-5;
- NPU vs CPU: the same integer codes; the NPU takes antiquant_scale / offset in the activation dtype
  (one rounding of each group scale: 2^-11 relative in float16, 2^-8 in bfloat16) and rounds the
  output once. Bound 0.5 % (float16) and 2 % (bfloat16) of the range; measured at most 0.08 % and
  0.7 % (2026-12-07).
"""
from __future__ import annotations

import logging
import re

import pytest
import torch

from ascend_llm.ops import build_op_set
from tests.ops.group_weight_layers import bind, dequantized, group_layer
from tests.ops.npu_emulation import FakeTorchNPU, NPUArgumentError, install_fake_torch_npu
from tests.ops.npu_emulation import npu_emulation  # noqa: F401  (fixture)

K, N = 198, 48
NPU_BOUND = {torch.float16: 5e-3, torch.bfloat16: 2e-2}


def _x(m: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(m, K, generator=torch.Generator().manual_seed(seed)).to(dtype)    # [m, k]


def _range_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, None])
@pytest.mark.parametrize("asymmetric", [False, True])
def test_cpu_reference_matches_the_definition(bits, group_size, asymmetric):
    layer = group_layer(N, K, bits, group_size, asymmetric, torch.float32, seed=bits + (group_size or 0))
    kernel = bind(layer, build_op_set("cpu"))
    assert kernel.name == "cpu.weight_only_group_matmul"
    x, bias = _x(5, torch.float32, 1), torch.randn(N, generator=torch.Generator().manual_seed(2))
    got = kernel.run(layer, x, bias)                                                   # [5, n]
    want = x.double() @ dequantized(layer).t() + bias.double()
    assert _range_error(got, want) < 1e-5


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("asymmetric", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_npu_kernel_matches_cpu_reference(npu_emulation, bits, group_size, asymmetric, dtype):
    seed = 10 * bits + group_size + asymmetric
    cpu_layer = group_layer(N, K, bits, group_size, asymmetric, dtype, seed)
    npu_layer = group_layer(N, K, bits, group_size, asymmetric, dtype, seed)
    cpu_kernel, npu_kernel = bind(cpu_layer, build_op_set("cpu")), bind(npu_layer, build_op_set("npu"))
    assert npu_kernel.name == "npu.weight_quant_batchmatmul_group"
    x, bias = _x(7, dtype, seed), (torch.randn(N, generator=torch.Generator().manual_seed(seed)) * 0.1).to(dtype)
    got, ref = npu_kernel.run(npu_layer, x, bias), cpu_kernel.run(cpu_layer, x, bias)
    assert got.dtype == dtype and got.shape == (7, N)
    assert _range_error(got, ref) < NPU_BOUND[dtype]
    groups = -(-K // group_size)
    call = npu_emulation.called("npu_weight_quant_batchmatmul")[-1].args
    assert call["weight"] == (f"int8[{K}, {N}]:ND" if bits == 8 else f"int32[{K}, {N // 8}]:ND")
    dtype_name = str(dtype).removeprefix("torch.")
    assert call["antiquant_scale"] == f"{dtype_name}[{groups}, {N}]:ND"
    assert (call["antiquant_offset"] == "None") != asymmetric


def test_one_group_per_row_runs_per_channel(npu_emulation):
    """group_size >= k (compressed-tensors strategy "channel"): antiquant_group_size 0, scale [n]."""
    layer = group_layer(N, K, 8, None, True, torch.float16, seed=5)
    reference = group_layer(N, K, 8, None, True, torch.float16, seed=5)
    kernel = bind(layer, build_op_set("npu"))
    assert layer.npu_antiquant_group_size == 0 and layer.npu_antiquant_scale.shape == (N,)
    x = _x(3, torch.float16, 6)
    ref = bind(reference, build_op_set("cpu")).run(reference, x, None)
    assert _range_error(kernel.run(layer, x, None), ref) < NPU_BOUND[torch.float16]


@pytest.mark.parametrize("n, group_size, dtype, soc, reason", [
    (44, 32, torch.float16, "Ascend910B1", r"n=44 \(npu_convert_weight_to_int4pack packs the output dim in eights\)"),
    (N, 48, torch.float16, "Ascend910B1", r"group_size=48 \(antiquant_group_size must be a multiple of 32"),
    (N, 32, torch.float32, "Ascend910B1", r"dtype=torch.float32"),
    (N, 32, torch.float16, "Ascend310P3", r"310P .*no per-group antiquant"),
])
def test_npu_steps_aside_to_the_reference_with_the_reason(monkeypatch, caplog, n, group_size, dtype, soc, reason):
    """Traits npu_weight_quant_batchmatmul cannot take: the registry picks the plain-torch reference
    on the NPU device and logs why; the layer still computes the CPU's result."""
    install_fake_torch_npu(monkeypatch, soc)
    layer = group_layer(n, K, 4, group_size, False, dtype, seed=7)
    reference = group_layer(n, K, 4, group_size, False, dtype, seed=7)
    with caplog.at_level(logging.INFO, logger="ascend_llm.ops.registry"):
        kernel = bind(layer, build_op_set("npu"))
    assert kernel.name == "npu.torch_reference.weight_only_group_matmul"
    lines = [r.getMessage() for r in caplog.records if "steps aside" in r.getMessage()]
    assert len(lines) == 1 and "weight_only_group_matmul" in lines[0], lines
    assert re.search(reason, lines[0]), lines[0]
    x = _x(3, dtype, 8)
    ref = bind(reference, build_op_set("cpu")).run(reference, x, None)
    assert torch.equal(kernel.run(layer, x, None), ref)


@pytest.mark.parametrize("group_size, soc, match", [
    (48, "Ascend910B1", r"multiple of 32 in \[32, k - 1\]"),
    (256, "Ascend910B1", r"multiple of 32 in \[32, k - 1\]"),         # >= k = 198
    (32, "Ascend310P3", r"per-group antiquant is not supported on 310P"),
])
def test_emulation_enforces_the_documented_group_contract(group_size, soc, match):
    fake = FakeTorchNPU(soc)
    x = torch.randn(2, K).half()
    weight = torch.zeros(K, N, dtype=torch.int8)
    scale = torch.ones(-(-K // group_size), N).half()                      # [ceil(k / g), n]
    with pytest.raises(NPUArgumentError, match=match):
        fake.npu_weight_quant_batchmatmul(x, weight, scale, antiquant_group_size=group_size)


def test_emulation_applies_each_group_to_its_rows():
    """(w + offset[i // g]) * scale[i // g] for weight row i: a weight of ones with distinct
    group scales and offsets sums, per output column, g * (1 + offset_j) * scale_j over groups."""
    fake = FakeTorchNPU()
    k, n, g = 96, 8, 32
    scale = torch.tensor([1.0, 2.0, 4.0]).half()[:, None].expand(3, n).contiguous()     # [3, n]
    offset = torch.tensor([0.0, -1.0, 1.0]).half()[:, None].expand(3, n).contiguous()   # [3, n]
    y = fake.npu_weight_quant_batchmatmul(torch.ones(1, k).half(), torch.ones(k, n, dtype=torch.int8),
                                          scale, offset, antiquant_group_size=g)
    assert torch.equal(y, torch.full((1, n), g * (1 * 1.0 + 0 * 2.0 + 2 * 4.0)).half())
