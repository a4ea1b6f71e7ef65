"""Triton weight-only int8 / int4 GEMV (M <= 16, split-K) and GEMM vs `cpu_quant.weight_only_matmul`.

Tolerance: both accumulate x @ q.T in fp32, in different orders: rtol 1e-4 plus atol 1e-4 for
fp32 outputs (values are O(50) here); fp16 outputs within one fp16 rounding (rtol 2e-3).
"""
from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
from ascend_llm.numerics import primitives as P  # noqa: E402
from ascend_llm.ops import cpu_quant  # noqa: E402
from ascend_llm.ops.triton import weight_only  # noqa: E402

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=2e-3, atol=2e-3)}


def _layer(n: int, k: int, bits: int) -> types.SimpleNamespace:
    q, scale = P.quantize_per_channel(torch.randn(n, k), bits)
    if bits == 4:
        q = P.pack_int4(q)
    layer = types.SimpleNamespace(weight=torch.nn.Parameter(q, requires_grad=False),
                                  weight_scale=torch.nn.Parameter(scale, requires_grad=False),
                                  quant_bits=bits, in_features_k=k)
    weight_only.prepare_weight_only(layer)
    return layer


def _layer_on(layer: types.SimpleNamespace, device: torch.device) -> types.SimpleNamespace:
    """A copy of `layer` with its tensors on `device`, prepared there."""
    moved = types.SimpleNamespace(**{name: value.to(device) if isinstance(value, torch.Tensor) else value
                                     for name, value in vars(layer).items()})
    weight_only.prepare_weight_only(moved)
    return moved


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 17])            # 1, 3: GEMV path; 17: GEMM path
def test_matches_reference(seed: int, device: torch.device, bits: int, dtype: torch.dtype, m: int) -> None:
    n, k = 70, 299                                   # odd k: the int4 pad nibble is read
    layer = _layer(n, k, bits)
    x, bias = torch.randn(m, k).to(dtype), torch.randn(n)
    got = weight_only.weight_only_matmul(_layer_on(layer, device), x.to(device), bias.to(device)).cpu()
    ref = cpu_quant.weight_only_matmul(layer, x, bias)
    assert got.dtype == dtype and got.shape == (m, n)
    torch.testing.assert_close(got, ref, **TOL[dtype], msg=lambda s: f"seed {seed}: {s}")


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("split_k", [1, 3])
def test_gemv_split_k(seed: int, device: torch.device, bits: int, split_k: int) -> None:
    n, k = 40, 700
    layer = _layer(n, k, bits)
    x = torch.randn(2, k)
    on = _layer_on(layer, device)
    got = weight_only.weight_only_gemm(x.to(device), on.weight, on.weight_scale, k, bits, split_k=split_k).cpu()
    ref = cpu_quant.weight_only_matmul(layer, x, None)
    torch.testing.assert_close(got, ref, **TOL[torch.float32], msg=lambda s: f"seed {seed}: {s}")


def test_leading_dims_kept(seed: int, device: torch.device) -> None:
    layer = _layer(24, 64, 4)
    x = torch.randn(2, 3, 64)
    got = weight_only.weight_only_matmul(_layer_on(layer, device), x.to(device), None).cpu()
    assert got.shape == (2, 3, 24)
    torch.testing.assert_close(got, cpu_quant.weight_only_matmul(layer, x, None), **TOL[torch.float32],
                               msg=lambda s: f"seed {seed}: {s}")


def test_prepare_rejects_wrong_layout() -> None:
    layer = _layer(8, 32, 8)
    layer.quant_bits = 4                             # int8 [n, k] is not a packed int4 weight
    with pytest.raises(ValueError, match=r"wint4 kernel needs torch.uint8"):
        weight_only.prepare_weight_only(layer)
