"""Triton RMSNorm / add_rms_norm / rope / silu_and_mul vs the CPU reference.

Tolerances: fp32 within 1e-5 (reductions summed in another order); fp16 within one rounding
(rtol 1e-3). bf16 runs only on a GPU (conftest's cuda mode): the interpreter rounds
fp32 -> bf16 by truncation, not to nearest even as the GPU does.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
from ascend_llm.ops import cpu  # noqa: E402
from ascend_llm.ops.triton import norm_rope_act as nra  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-3, atol=1e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


@pytest.fixture(params=DTYPES, ids=str)
def dtype(request: pytest.FixtureRequest, device: torch.device) -> torch.dtype:
    if request.param == torch.bfloat16 and device.type == "cpu":
        pytest.skip("bf16: the interpreter truncates fp32 -> bf16 (GPU rounds to nearest even)")
    return request.param


def _close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, seed: int) -> None:
    torch.testing.assert_close(got.cpu(), ref, **TOL[dtype], msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.parametrize("num_tokens,hidden", [(1, 64), (3, 96), (17, 200)])
def test_rms_norm(seed: int, device: torch.device, dtype: torch.dtype, num_tokens: int, hidden: int) -> None:
    x = (torch.randn(num_tokens, hidden) * 3).to(dtype)
    w = (torch.rand(hidden) + 0.5).to(dtype)
    _close(nra.rms_norm(x.to(device), w.to(device), 1e-6), cpu.rms_norm(x, w, 1e-6), dtype, seed)


@pytest.mark.parametrize("num_tokens,hidden", [(1, 64), (17, 200)])
def test_add_rms_norm(seed: int, device: torch.device, dtype: torch.dtype, num_tokens: int,
                      hidden: int) -> None:
    x, res = torch.randn(2, num_tokens, hidden).to(dtype)
    w = (torch.rand(hidden) + 0.5).to(dtype)
    out, new_res = nra.add_rms_norm(x.to(device), res.to(device), w.to(device), 1e-5)
    ref_out, ref_res = cpu.add_rms_norm(x, res, w, 1e-5)
    torch.testing.assert_close(new_res.cpu(), ref_res, rtol=0, atol=0, msg=lambda m: f"seed {seed}: {m}")
    _close(out, ref_out, dtype, seed)


@pytest.mark.parametrize("num_tokens,heads,kv_heads,head_dim", [(1, 4, 2, 32), (5, 3, 1, 24), (17, 2, 2, 64)])
def test_rope(seed: int, device: torch.device, dtype: torch.dtype, num_tokens: int, heads: int,
              kv_heads: int, head_dim: int) -> None:
    # q/k as strided views of one fused qkv tensor, as the attention layer produces them
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_dim).to(dtype)
    angle = torch.rand(num_tokens, 1, head_dim // 2) * 6
    cos = torch.cat([angle.cos(), angle.cos()], dim=-1)
    sin = torch.cat([-angle.sin(), angle.sin()], dim=-1)

    def split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = t[:, :heads * head_dim].view(num_tokens, heads, head_dim)
        k = t[:, heads * head_dim:(heads + kv_heads) * head_dim].view(num_tokens, kv_heads, head_dim)
        return q, k

    got_q, got_k = nra.rope(*split(qkv.to(device)), cos.to(device), sin.to(device))
    ref_q, ref_k = cpu.rope(*split(qkv), cos, sin)
    _close(got_q, ref_q, dtype, seed)
    _close(got_k, ref_k, dtype, seed)


def test_rope_rejects_odd_head_dim(device: torch.device) -> None:
    q = torch.randn(2, 1, 5, device=device)
    with pytest.raises(ValueError, match="head_dim"):
        nra.rope(q, q, q[:, :1], q[:, :1])


@pytest.mark.parametrize("num_tokens,d", [(1, 16), (3, 50), (17, 1100)])
def test_silu_and_mul(seed: int, device: torch.device, dtype: torch.dtype, num_tokens: int, d: int) -> None:
    x = (torch.randn(num_tokens, 2 * d) * 4).to(dtype)
    _close(nra.silu_and_mul(x.to(device)), cpu.silu_and_mul(x), dtype, seed)


def test_empty_batch(device: torch.device) -> None:
    x, w = torch.randn(0, 64, device=device), torch.rand(64, device=device) + 0.5
    assert nra.rms_norm(x, w, 1e-6).shape == (0, 64)
    assert nra.add_rms_norm(x, x, w, 1e-6)[0].shape == (0, 64)
    assert nra.silu_and_mul(torch.randn(0, 32, device=device)).shape == (0, 16)
