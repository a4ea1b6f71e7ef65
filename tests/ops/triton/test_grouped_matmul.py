"""Triton grouped matmul (MoE experts) vs the CPU reference `cpu_moe.grouped_matmul`.

Tolerance: both accumulate in fp32, in different orders: rtol 1e-4 + atol 1e-4 for fp32
(|y| < 10 here); fp16 outputs within one fp16 rounding (2e-3).
"""
from __future__ import annotations

import importlib
import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
from ascend_llm.ops import cpu_moe  # noqa: E402


# the kernel is decorated for Triton's interpreter at import time when TRITON_INTERPRET is set
# (see conftest.py, which does the same for the other kernel modules)
_previous = os.environ.get("TRITON_INTERPRET")
if not torch.cuda.is_available() or os.environ.get("ASCEND_LLM_TRITON_TEST_DEVICE") == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
try:
    gm = importlib.import_module("ascend_llm.ops.triton.grouped_matmul")
finally:
    if _previous is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _previous

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=2e-3, atol=2e-3)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("counts", [[3, 0, 17, 1], [0, 0, 5, 0], [1, 1, 1, 1], [40, 0, 0, 2]])
def test_grouped_matmul_matches_cpu_reference(device, seed, dtype, counts):
    k, n = 40, 48                                        # not multiples of the tiles: masks matter
    x = torch.randn(sum(counts) + 2, k)                  # 2 trailing rows belong to no expert
    w = torch.randn(len(counts), k, n) * 0.2
    group_list = torch.tensor(counts).cumsum(0)
    want = cpu_moe.grouped_matmul(x.to(dtype), w.to(dtype), group_list)
    got = gm.grouped_matmul(x.to(dtype).to(device), w.to(dtype).to(device), group_list.to(device)).cpu()
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype], msg=f"seed {seed}")
    assert bool((got[sum(counts):] == 0).all())


def test_row_tiles_split_each_expert_without_spanning_two():
    expert, start, end = gm.row_tiles(torch.tensor([3, 3, 40, 42]), 16)
    assert expert.tolist() == [0, 2, 2, 2, 3]
    assert start.tolist() == [0, 3, 19, 35, 40]
    assert end.tolist() == [3, 40, 40, 40, 42]


def test_registered_on_cuda_backend():
    from ascend_llm.ops import build_registry
    registry = build_registry(("cuda",))
    assert registry.select("grouped_matmul", "cuda", dtype=torch.float32).name == "cuda.triton.grouped_matmul"
    triton_kernel = registry.kernels[("grouped_matmul", "cuda")][0]
    assert "float32 / float16 / bfloat16" in triton_kernel.supports(dtype=torch.int8)
