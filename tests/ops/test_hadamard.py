"""`hadamard_transform` kernels (CPU matmul, NPU batch matmul through the emulated torch_npu) vs the
float64 fast Walsh-Hadamard butterfly (numerics/hadamard.py), on fresh random inputs.

Tolerances: fp32 outputs are one fp32 matmul (b products summed) away from the float64 butterfly:
|x| ~ 1 -> atol 1e-5. fp16 / bf16: the CPU kernel computes in fp32 and rounds once (half a step:
fp16 2^-11, bf16 2^-8 relative); the NPU kernel multiplies by H_b rounded to the input dtype (for
b = 512 a common scale 1.1e-4 low in bf16) and rounds the fp32 accumulation once: within one step,
rtol 2^-10 (fp16) / 2^-7 (bf16) with atol for values near 0 of the same size.
"""
from __future__ import annotations

import os

import pytest
import torch

from ascend_llm.numerics.hadamard import hadamard_matrix, hadamard_transform_fwht, rotate_input_blocks
from ascend_llm.ops import build_op_set
from tests.ops.npu_emulation import npu_emulation  # noqa: F401  (fixture)

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2 ** -10, atol=2 ** -10),
       torch.bfloat16: dict(rtol=2 ** -7, atol=2 ** -7)}
SHAPES = [((1, 1536), 512), ((7, 96), 32), ((3, 5, 64), 16)]      # (x shape, block size)


@pytest.fixture
def seed() -> int:
    value = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(value)
    return value


def _check(got: torch.Tensor, x: torch.Tensor, block: int, seed: int) -> None:
    assert got.shape == x.shape and got.dtype == x.dtype
    ref = hadamard_transform_fwht(x, block).to(torch.float32)
    torch.testing.assert_close(got.float(), ref, **TOL[x.dtype], msg=lambda m: f"seed {seed}: {m}")


def test_matrix_is_the_normalized_sylvester_hadamard() -> None:
    h = hadamard_matrix(8, torch.float64)
    signs = torch.tensor([[(-1) ** bin(i & j).count("1") for j in range(8)] for i in range(8)], dtype=torch.float64)
    torch.testing.assert_close(h, signs / 8 ** 0.5, rtol=0, atol=0)
    torch.testing.assert_close(h @ h, torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-15)
    for bad in (0, 1, 3, 24, 2.0, True):
        with pytest.raises(ValueError, match="power of two"):
            hadamard_matrix(bad)


def test_folded_weight_times_rotated_input_is_the_original_product(seed: int) -> None:
    w, x = torch.randn(6, 96, dtype=torch.float64), torch.randn(4, 96, dtype=torch.float64)
    rotated = rotate_input_blocks(w, 32)
    torch.testing.assert_close(hadamard_transform_fwht(x, 32) @ rotated.T, x @ w.T, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(x @ rotated.T, x @ w.T, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,block", SHAPES)
def test_cpu_kernel_matches_butterfly(seed: int, dtype: torch.dtype, shape: tuple[int, ...], block: int) -> None:
    ops = build_op_set("cpu")
    kernel = ops.select("hadamard_transform", block_size=block)
    assert kernel.name == "cpu.hadamard_matmul"
    x = torch.randn(*shape).to(dtype)
    _check(kernel.run(x, block), x, block, seed)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape,block", SHAPES)
def test_npu_kernel_matches_butterfly(npu_emulation, seed: int, dtype: torch.dtype, shape: tuple[int, ...],
                                      block: int) -> None:
    ops = build_op_set("npu")
    kernel = ops.select("hadamard_transform", block_size=block)
    assert kernel.name == "npu.hadamard_batch_matmul"          # its own kernel, not the reference fallback
    x = torch.randn(*shape).to(dtype)
    _check(kernel.run(x, block), x, block, seed)
    assert npu_emulation.calls == []                            # plain torch matmul, no torch_npu op


def test_block_size_that_is_not_a_power_of_two_is_rejected_by_every_kernel(npu_emulation) -> None:
    for backend in ("cpu", "npu"):
        with pytest.raises(ValueError, match=r"block_size=24 is not a power of two"):
            build_op_set(backend).select("hadamard_transform", block_size=24)
