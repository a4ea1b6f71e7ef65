"""Triton W8A8 kernels vs `ops/cpu_int8.py`.

The int32 accumulator and the activation quantization must be bit-exact; the dequantized
outputs apply the same fp32 operations in the same order, so they are compared exactly too
(fp32 rounding is deterministic), and fp16 outputs within one fp16 rounding.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
from ascend_llm.ops import cpu_int8  # noqa: E402
from ascend_llm.ops.triton import int8_gemm  # noqa: E402

SHAPES = [(1, 64, 48), (3, 200, 70), (17, 257, 130)]      # (M, k, n): k, n not multiples of tiles


def _on(device: torch.device, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.to(device) for t in tensors]


def _int8(*shape: int) -> torch.Tensor:
    return torch.randint(-128, 128, shape, dtype=torch.int8)


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_int32_accumulation_bit_exact(seed: int, device: torch.device, m: int, k: int, n: int) -> None:
    q_x, weight = _int8(m, k), _int8(n, k)
    got = int8_gemm.int8_gemm(q_x.to(device), weight.to(device)).cpu()
    assert got.dtype == torch.int32
    assert torch.equal(got, cpu_int8.int8_matmul_reference(q_x, weight)), f"seed {seed}"


def test_int32_accumulation_at_the_extremes(device: torch.device) -> None:
    # every product is (-128)^2: the largest partial sums an int8 GEMM can make
    q_x = torch.full((3, 300), -128, dtype=torch.int8, device=device)
    weight = torch.full((5, 300), -128, dtype=torch.int8, device=device)
    want = torch.full((3, 5), 300 * 128 * 128, dtype=torch.int32)
    assert torch.equal(int8_gemm.int8_gemm(q_x, weight).cpu(), want)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_static_quant_matmul(seed: int, device: torch.device, m: int, k: int, n: int,
                             out_dtype: torch.dtype) -> None:
    q_x, weight = _int8(m, k), _int8(n, k)
    deq_scale = torch.rand(n) * 1e-4 + 1e-6
    quant_bias = torch.randint(-50000, 50000, (n,), dtype=torch.int32)
    got = int8_gemm.quant_matmul(*_on(device, q_x, weight, deq_scale, quant_bias), out_dtype).cpu()
    ref = cpu_int8.quant_matmul(q_x, weight, deq_scale, quant_bias, out_dtype)
    torch.testing.assert_close(got, ref, rtol=0, atol=0, msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_dynamic_quant_matmul(seed: int, device: torch.device, m: int, k: int, n: int,
                              with_bias: bool) -> None:
    q_x, weight = _int8(m, k), _int8(n, k)
    weight_scale, token_scale = torch.rand(n) * 1e-3, torch.rand(m) * 1e-2
    bias = torch.randn(n) if with_bias else None
    q_x_, weight_, weight_scale_, bias_, token_scale_ = _on(device, q_x, weight, weight_scale, bias, token_scale)
    got = int8_gemm.quant_matmul(q_x_, weight_, weight_scale_, bias_, torch.float32,
                                 pertoken_scale=token_scale_).cpu()
    ref = cpu_int8.quant_matmul(q_x, weight, weight_scale, bias, torch.float32, pertoken_scale=token_scale)
    torch.testing.assert_close(got, ref, rtol=0, atol=0, msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,k", [(1, 64), (17, 1030)])
def test_quantize_per_tensor_bit_exact(seed: int, device: torch.device, dtype: torch.dtype, m: int,
                                       k: int) -> None:
    x = (torch.randn(m, k) * 4).to(dtype)
    scale, offset = torch.tensor(0.021), torch.tensor(-7.0)
    # include exact .5 ties so half-to-even rounding is exercised
    x[0, :4] = (torch.tensor([0.5, 1.5, -2.5, 3.5]) - offset) * scale
    got = int8_gemm.quantize_per_tensor(*_on(device, x, scale, offset)).cpu()
    assert torch.equal(got, cpu_int8.quantize_per_tensor_reference(x, scale, offset)), f"seed {seed}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,k", [(1, 64), (3, 100), (17, 1030)])
def test_dynamic_quant_per_token_bit_exact(seed: int, device: torch.device, dtype: torch.dtype, m: int,
                                           k: int) -> None:
    x = (torch.randn(m, k) * 3).to(dtype)
    x[-1] = 0                                            # an all-zero row: scale 0, codes 0
    q, scale = (t.cpu() for t in int8_gemm.dynamic_quant_per_token(x.to(device)))
    ref_q, ref_scale = cpu_int8.dynamic_quant_per_token_reference(x)
    assert torch.equal(q, ref_q), f"seed {seed}"
    assert torch.equal(scale, ref_scale), f"seed {seed}"


def test_rejects_non_int8() -> None:
    with pytest.raises(ValueError, match="int8"):
        int8_gemm.int8_gemm(torch.zeros(2, 4), torch.zeros(3, 4, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[T, k\]"):
        int8_gemm.int8_gemm(_int8(2, 4), _int8(3, 5))
