"""Triton fp8 kernels vs `cpu_quant` / `primitives`, and the `torch._scaled_mm` wrapper against
an emulation of its documented contract on CPU (the real op needs an sm89+ GPU; in the conftest's
cuda mode `test_scaled_mm_matches_reference_on_gpu` runs it).

Activation quantization is bit-exact (same e4m3 codes, same scales). GEMMs: both sum exact
products of e4m3 codes in fp32 with the same scales, in different orders: rtol 1e-4 and
atol 1e-4 * max|ref|.
"""
from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
from ascend_llm.numerics import primitives as P  # noqa: E402
from ascend_llm.ops import cpu_quant  # noqa: E402
from ascend_llm.ops.triton import fp8  # noqa: E402
from ascend_llm.quant.w8a8 import wfp8_dynamic_matmul_reference  # noqa: E402


def _close(got: torch.Tensor, ref: torch.Tensor, seed: int) -> None:
    atol = 1e-4 * float(ref.abs().max())
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=atol, msg=lambda s: f"seed {seed}: {s}")


def _bits(q: torch.Tensor) -> torch.Tensor:
    return q.cpu().view(torch.uint8)


def _on(device: torch.device, layer: types.SimpleNamespace, prepare) -> types.SimpleNamespace:
    """A copy of `layer` with its tensors on `device`, prepared there."""
    moved = types.SimpleNamespace(**{name: value.to(device) if isinstance(value, torch.Tensor) else value
                                     for name, value in vars(layer).items()})
    prepare(moved)
    return moved


def test_e4m3_rounding_matches_torch_on_every_code_and_midpoint(device: torch.device) -> None:
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    codes = codes[codes.isfinite()].unique()                          # 253 distinct values
    midpoints = (codes[:-1] + codes[1:]) / 2                          # ties: round to even
    x = torch.cat([codes, midpoints, midpoints.nextafter(torch.tensor(1e9)),
                   midpoints.nextafter(torch.tensor(-1e9)), torch.tensor([500.0, -1e6])])
    got = fp8.quantize_fp8_static(x.to(device), torch.tensor(1.0, device=device))
    assert torch.equal(_bits(got), _bits(P.fp8_cast(x)))


@pytest.mark.parametrize("m,k,group", [(1, 128, 128), (3, 300, 128), (17, 96, 32)])
def test_per_token_group_quant_bit_exact(seed: int, device: torch.device, m: int, k: int, group: int) -> None:
    x = torch.randn(m, k) * torch.logspace(-3, 3, k)                  # groups of very different scale
    q, scale = fp8.quantize_fp8_per_token_group(x.to(device), group)
    ref_q, ref_scale = P.quantize_fp8_per_token_group(x, group)
    assert torch.equal(_bits(q), _bits(ref_q)), f"seed {seed}"
    assert torch.equal(scale.cpu(), ref_scale), f"seed {seed}"


def test_per_tensor_quant_bit_exact(seed: int, device: torch.device) -> None:
    x = torch.randn(5, 77) * 10
    q, scale = fp8.quantize_fp8_per_tensor(x.to(device))
    ref_q, ref_scale = P.quantize_fp8_per_tensor(x, min_scale=P.FP8_MIN_SCALE)
    assert torch.equal(_bits(q), _bits(ref_q)) and torch.equal(scale.cpu(), ref_scale), f"seed {seed}"


def _block_layer(n: int, k: int, block: tuple[int, int]) -> types.SimpleNamespace:
    q, scale_inv = P.quantize_fp8_block(torch.randn(n, k), block)
    layer = types.SimpleNamespace(weight=torch.nn.Parameter(q, requires_grad=False),
                                  weight_scale_inv=torch.nn.Parameter(scale_inv, requires_grad=False),
                                  weight_block_size=block)
    fp8.prepare_block(layer)
    return layer


@pytest.mark.parametrize("m,n,k,block", [(1, 200, 300, (128, 128)), (3, 130, 256, (128, 128)),
                                         (17, 70, 100, (32, 32))])
def test_block_fp8_matmul(seed: int, device: torch.device, m: int, n: int, k: int,
                          block: tuple[int, int]) -> None:
    layer = _block_layer(n, k, block)                 # partial edge blocks in n and/or k
    x, bias = torch.randn(m, k), torch.randn(n)
    got = fp8.fp8_matmul_block(_on(device, layer, fp8.prepare_block), x.to(device), bias.to(device))
    _close(got.cpu(), cpu_quant.fp8_matmul_block(layer, x, bias), seed)


def test_block_prepare_rejects_non_power_of_two_k_block() -> None:
    layer = types.SimpleNamespace(weight_block_size=(128, 96))
    with pytest.raises(ValueError, match="power of two"):
        fp8.prepare_block(layer)


def _per_tensor_layer(n: int, k: int, input_scale: float | None = None) -> types.SimpleNamespace:
    q, scale = P.quantize_fp8_per_tensor(torch.randn(n, k))
    layer = types.SimpleNamespace(weight=torch.nn.Parameter(q, requires_grad=False),
                                  weight_scale=torch.nn.Parameter(scale, requires_grad=False))
    if input_scale is not None:
        layer.input_scale = torch.nn.Parameter(torch.tensor(input_scale), requires_grad=False)
    fp8.prepare_per_tensor(layer)
    return layer


@pytest.mark.parametrize("m,n,k", [(1, 48, 64), (17, 70, 99)])
def test_per_tensor_triton_path(seed: int, device: torch.device, m: int, n: int, k: int) -> None:
    x, bias = torch.randn(m, k) * 5, torch.randn(n)
    for run, ref, input_scale in ((fp8.fp8_matmul_per_tensor, cpu_quant.fp8_matmul_per_tensor, None),
                                  (fp8.fp8_matmul_per_tensor_static, cpu_quant.fp8_matmul_per_tensor_static,
                                   0.01)):
        layer = _per_tensor_layer(n, k, input_scale)
        on = _on(device, layer, fp8.prepare_per_tensor)
        on.fp8_use_scaled_mm = False                 # the Triton GEMM, whatever the shape
        _close(run(on, x.to(device), bias.to(device)).cpu(), ref(layer, x, bias), seed)


def _emulated_scaled_mm(mat1: torch.Tensor, mat2: torch.Tensor, *, scale_a: torch.Tensor,
                        scale_b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """torch._scaled_mm's documented tensor-wise contract, checked, then computed in fp32."""
    assert mat1.dtype == mat2.dtype == torch.float8_e4m3fn
    assert mat1.stride(1) == 1, "mat1 must be row-major"
    assert mat2.stride(0) == 1, "mat2 must be column-major"
    assert mat1.shape[1] % 16 == 0 and mat2.shape[0] % 16 == 0 and mat2.shape[1] % 16 == 0
    assert scale_a.dtype == scale_b.dtype == torch.float32 and scale_a.numel() == scale_b.numel() == 1
    return ((mat1.float() @ mat2.float()) * (scale_a * scale_b)).to(out_dtype)


@pytest.mark.parametrize("static", [False, True])
def test_scaled_mm_wrapper_scale_handling(seed: int, monkeypatch: pytest.MonkeyPatch, static: bool) -> None:
    layer = _per_tensor_layer(48, 64, input_scale=0.02 if static else None)
    layer.fp8_use_scaled_mm = True                   # what prepare sets on an sm89+ GPU
    monkeypatch.setattr(torch, "_scaled_mm", _emulated_scaled_mm)
    x, bias = torch.randn(3, 64) * 3, torch.randn(48)
    run, ref = ((fp8.fp8_matmul_per_tensor_static, cpu_quant.fp8_matmul_per_tensor_static) if static
                else (fp8.fp8_matmul_per_tensor, cpu_quant.fp8_matmul_per_tensor))
    _close(run(layer, x, bias), ref(layer, x, bias), seed)


def test_scaled_mm_shape_rule() -> None:
    assert fp8.scaled_mm_shape_ok(4096, 11008)
    assert not fp8.scaled_mm_shape_ok(70, 64) and not fp8.scaled_mm_shape_ok(64, 99)


@pytest.mark.parametrize("static", [False, True])
def test_scaled_mm_matches_reference_on_gpu(seed: int, device: torch.device, static: bool) -> None:
    if device.type != "cuda" or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("the real torch._scaled_mm needs an sm89+ GPU (cuda mode of the conftest)")
    layer = _per_tensor_layer(64, 128, input_scale=0.02 if static else None)
    on = _on(device, layer, fp8.prepare_per_tensor)
    assert on.fp8_use_scaled_mm
    x, bias = torch.randn(5, 128) * 3, torch.randn(64)
    run, ref = ((fp8.fp8_matmul_per_tensor_static, cpu_quant.fp8_matmul_per_tensor_static) if static
                else (fp8.fp8_matmul_per_tensor, cpu_quant.fp8_matmul_per_tensor))
    _close(run(on, x.to(device), bias.to(device)).cpu(), ref(layer, x, bias), seed)


@pytest.mark.parametrize("m,k", [(1, 64), (17, 300)])
def test_per_token_quant_bit_exact(seed: int, device: torch.device, m: int, k: int) -> None:
    x = torch.randn(m, k) * torch.logspace(-2, 2, m)[:, None]          # rows of very different scale
    q, scale = fp8.quantize_fp8_per_token(x.to(device))
    ref_q, ref_scale = P.quantize_fp8_per_token_group(x, group_size=k)
    assert torch.equal(_bits(q), _bits(ref_q)) and torch.equal(scale.cpu(), ref_scale), f"seed {seed}"


def _row_wise_layer(n: int, k: int) -> types.SimpleNamespace:
    w = torch.randn(n, k) * torch.logspace(-2, 1, n)[:, None]
    scale = w.abs().amax(dim=1, keepdim=True) / P.FP8_MAX                # [n, 1], as WFP8AFP8_DYNAMIC
    return types.SimpleNamespace(weight=torch.nn.Parameter(P.fp8_cast(w / scale), requires_grad=False),
                                 weight_scale=torch.nn.Parameter(scale, requires_grad=False))


@pytest.mark.parametrize("m,n,k", [(1, 48, 64), (17, 70, 99)])
def test_row_wise_triton_path(seed: int, device: torch.device, m: int, n: int, k: int) -> None:
    layer = _row_wise_layer(n, k)
    on = _on(device, layer, fp8.prepare_per_token)
    on.fp8_use_scaled_mm = False
    x, bias = torch.randn(m, k) * 3, torch.randn(n)
    ref = wfp8_dynamic_matmul_reference(x, layer.weight, layer.weight_scale.reshape(-1), bias)
    _close(fp8.fp8_matmul_per_token(on, x.to(device), bias.to(device)).cpu(), ref, seed)


def _emulated_row_wise_scaled_mm(mat1: torch.Tensor, mat2: torch.Tensor, *, scale_a: torch.Tensor,
                                 scale_b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """torch._scaled_mm's documented row-wise contract: scale_a [m, 1], scale_b [1, n] fp32, bf16 out."""
    assert mat1.stride(1) == 1 and mat2.stride(0) == 1
    assert scale_a.shape == (mat1.shape[0], 1) and scale_b.shape == (1, mat2.shape[1])
    assert scale_a.dtype == scale_b.dtype == torch.float32 and out_dtype == torch.bfloat16
    return ((mat1.float() @ mat2.float()) * scale_a * scale_b).to(out_dtype)


def test_row_wise_scaled_mm_wrapper(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    layer = _row_wise_layer(48, 64)
    fp8.prepare_per_token(layer)
    layer.fp8_use_scaled_mm = True
    monkeypatch.setattr(torch, "_scaled_mm", _emulated_row_wise_scaled_mm)
    x, bias = torch.randn(3, 64), torch.randn(48)
    got = fp8.fp8_matmul_per_token(layer, x.bfloat16(), bias.bfloat16())
    ref = wfp8_dynamic_matmul_reference(x.bfloat16(), layer.weight, layer.weight_scale.reshape(-1),
                                        bias.bfloat16())
    assert got.dtype == torch.bfloat16
    # bf16 in and out: within two bf16 roundings of the fp32 result
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2 * float(ref.abs().max()),
                               msg=lambda s: f"seed {seed}: {s}")


def test_row_wise_prepare_rejects_per_tensor_scale() -> None:
    layer = _per_tensor_layer(16, 32)
    with pytest.raises(ValueError, match="one scale per output channel"):
        fp8.prepare_per_token(layer)


def test_row_wise_scaled_mm_on_gpu(seed: int, device: torch.device) -> None:
    if device.type != "cuda" or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("the real torch._scaled_mm needs an sm89+ GPU (cuda mode of the conftest)")
    layer = _row_wise_layer(64, 128)
    on = _on(device, layer, fp8.prepare_per_token)
    assert on.fp8_use_scaled_mm
    x = torch.randn(5, 128).bfloat16()
    got = fp8.fp8_matmul_per_token(on, x.to(device), None).cpu()
    ref = wfp8_dynamic_matmul_reference(x, layer.weight, layer.weight_scale.reshape(-1), None)
    torch.testing.assert_close(got.float(), ref, rtol=1e-2, atol=1e-2 * float(ref.abs().max()),
                               msg=lambda s: f"seed {seed}: {s}")
