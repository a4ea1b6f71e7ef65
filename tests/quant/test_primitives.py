"""Pure quant primitives: exact packing, round-trip error bounds, block/partial-block layout."""
from __future__ import annotations

import pytest
import torch

from ascend_llm.numerics import primitives as P


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (96, 576), (130, 96)])
def test_per_channel_round_trip_within_half_step(bits, shape):
    w = torch.randn(*shape, generator=_gen(bits + shape[0])) * torch.rand(shape[0], 1, generator=_gen(1)) * 3
    q, scale = P.quantize_per_channel(w, bits)
    qmax = P.int_qmax(bits)
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.shape == (shape[0],)
    assert int(q.abs().max()) <= qmax
    torch.testing.assert_close(scale, w.abs().amax(1) / qmax)                  # FastDeploy: amax / qmax
    assert (q.abs().amax(1) == qmax).all()                                     # the amax hits the top code
    err = (P.dequantize_per_channel(q, scale) - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-6).all()                            # round-to-nearest


def test_per_channel_zero_row_and_bad_input():
    w = torch.zeros(3, 5)
    w[1] = torch.arange(5.0)
    q, scale = P.quantize_per_channel(w, 8)
    assert (q[0] == 0).all() and (q[2] == 0).all() and torch.isfinite(scale).all()
    assert q[1].tolist() == [0, 32, 64, 95, 127]
    with pytest.raises(ValueError, match="bits"):
        P.quantize_per_channel(w, 3)
    with pytest.raises(ValueError, match="2-D"):
        P.quantize_per_channel(torch.zeros(4), 8)


def test_pack_int4_exact_nibble_order():
    q = torch.tensor([[1, -1, 7, -8, 3], [0, 2, -7, 5, -3]], dtype=torch.int8)
    packed = P.pack_int4(q)
    # low nibble = even k, high nibble = odd k, two's complement; odd k padded with a zero code
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3)
    assert packed[0].tolist() == [0x01 | 0xF0, 0x07 | 0x80, 0x03]
    assert packed[1].tolist() == [0x00 | 0x20, 0x09 | 0x50, 0x0D]
    assert torch.equal(P.unpack_int4(packed, 5), q)


@pytest.mark.parametrize("k", [1, 2, 33, 576])
def test_pack_unpack_int4_round_trip(k):
    q = torch.randint(-8, 8, (17, k), generator=_gen(k), dtype=torch.int8)
    packed = P.pack_int4(q)
    assert packed.shape == (17, (k + 1) // 2)
    assert torch.equal(P.unpack_int4(packed, k), q)


def test_pack_int4_rejects_out_of_range_and_bad_shapes():
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        P.pack_int4(torch.tensor([[8]], dtype=torch.int8))
    with pytest.raises(ValueError, match="k=5"):
        P.unpack_int4(torch.zeros(2, 2, dtype=torch.uint8), 5)


def test_fp8_per_tensor_round_trip():
    x = torch.randn(33, 130, generator=_gen(5)) * 4
    q, scale = P.quantize_fp8_per_tensor(x)
    assert q.dtype == torch.float8_e4m3fn and scale.dim() == 0
    torch.testing.assert_close(scale, x.abs().max() / 448)
    assert float(q.float().abs().max()) == 448.0
    deq = P.dequantize_fp8(q, scale)
    # e4m3 has 3 mantissa bits: relative error <= 2**-4 for normal values; subnormals (below
    # 2**-6 * scale) are spaced 2**-9 * scale apart, so the absolute error there is <= 2**-10 * scale
    bound = torch.maximum(x.abs() * 2 ** -4, torch.full_like(x, 2 ** -10 * float(scale)))
    assert ((deq - x).abs() <= bound + 1e-7).all()


def test_fp8_cast_saturates():
    assert P.fp8_cast(torch.tensor([1e6, -1e6])).float().tolist() == [448.0, -448.0]


@pytest.mark.parametrize("shape", [(128, 256), (576, 1536), (130, 96), (1, 7)])
def test_fp8_block_layout_and_round_trip(shape):
    n, k = shape
    w = torch.randn(n, k, generator=_gen(n + k)) * 0.05
    w[0, 0] = 3.0                                         # one outlier affects only its block
    q, scale_inv = P.quantize_fp8_block(w)
    nb, kb = -(-n // 128), -(-k // 128)
    assert q.shape == (n, k) and q.dtype == torch.float8_e4m3fn
    assert scale_inv.shape == (nb, kb) and scale_inv.dtype == torch.float32
    for i in range(nb):                                    # each block's own amax / 448
        for j in range(kb):
            block = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            assert float(scale_inv[i, j]) == pytest.approx(float(block.abs().max()) / 448, rel=1e-6)
    deq = P.dequantize_fp8_block(q, scale_inv)
    scale = P.expand_block_scale(scale_inv, (n, k))
    bound = torch.maximum(w.abs() * 2 ** -4, 2 ** -10 * scale)
    assert ((deq - w).abs() <= bound + 1e-7).all()


def test_expand_block_scale_rejects_mismatched_grid():
    with pytest.raises(ValueError, match="does not tile"):
        P.expand_block_scale(torch.ones(2, 2), (576, 576))


@pytest.mark.parametrize("shape", [(1, 576), (7, 96), (33, 130)])
def test_per_token_group_quant(shape):
    m, k = shape
    x = torch.randn(m, k, generator=_gen(k)) * torch.logspace(-2, 2, m)[:, None]
    q, scale = P.quantize_fp8_per_token_group(x, 128)
    g = -(-k // 128)
    assert q.shape == (m, k) and scale.shape == (m, g)
    for j in range(g):
        group = x[:, j * 128:(j + 1) * 128]
        torch.testing.assert_close(scale[:, j], (group.abs().amax(1) / 448).clamp_min(P.FP8_MIN_SCALE))
    deq = P.dequantize_fp8_per_token_group(q, scale, 128)
    full = scale.repeat_interleave(128, 1)[:, :k]
    assert ((deq - x).abs() <= torch.maximum(x.abs() * 2 ** -4, 2 ** -10 * full) + 1e-7).all()


def test_unpack_int4_halves_are_even_and_odd_k():
    q = torch.randint(-8, 8, (9, 33), generator=_gen(11), dtype=torch.int8)
    low, high = P.unpack_int4_halves(P.pack_int4(q))
    assert torch.equal(low, q[:, 0::2])
    assert torch.equal(high[:, :16], q[:, 1::2]) and (high[:, 16] == 0).all()   # odd k: zero pad code


def test_fp8_to_float16_scaled_is_exact_for_every_code():
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    finite = torch.isfinite(codes.float())                 # 0x7F / 0xFF are NaN in e4m3fn
    got = P.fp8_to_float16_scaled(codes).float() * P.FP8_FP16_RESCALE
    assert got.dtype == torch.float32 and torch.equal(got[finite], codes.float()[finite])
    assert int(finite.sum()) == 254
