"""The `apply_token_bitmask` op: the CPU reference against xgrammar's own kernel, the CPU kernel
that wraps xgrammar's against the reference, and the registration."""
from __future__ import annotations

import pytest
import torch
import xgrammar as xgr

from ascend_llm.ops import build_registry
from ascend_llm.ops.cpu_logits import apply_token_bitmask, unpack_token_bitmask, xgrammar_apply_token_bitmask


def _random_bitmask(rows: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """[rows, ceil(vocab / 32)] int32 with random bits (sign bits included)."""
    words = (vocab + 31) // 32
    return torch.randint(-2 ** 31, 2 ** 31, (rows, words), dtype=torch.int64, generator=generator).to(torch.int32)


@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 384, 1000])
def test_reference_matches_xgrammar_kernel(vocab):
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(5, vocab, generator=generator)
    bitmask = _random_bitmask(5, vocab, generator)
    expected = logits.clone()
    xgr.apply_token_bitmask_inplace(expected, bitmask)       # xgrammar's CPU kernel
    assert torch.equal(apply_token_bitmask(logits, bitmask), expected)


def test_indices_constrain_only_their_rows():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 100, generator=generator)
    full = _random_bitmask(6, 100, generator)                # xgrammar: one bitmask row per logits row
    rows = [4, 1]
    expected = logits.clone()
    xgr.apply_token_bitmask_inplace(expected, full, indices=rows)
    before = logits.clone()
    got = apply_token_bitmask(logits, full[rows], torch.tensor(rows))   # ours: only the masked rows
    assert torch.equal(got, expected)
    assert torch.equal(logits, before)                       # out of place: raw logits stay for logprobs


def test_logits_wider_than_the_bitmask_disallow_the_extra_ids():
    bitmask = torch.full((1, 1), -1, dtype=torch.int32)      # all 32 ids allowed
    out = apply_token_bitmask(torch.zeros(1, 40), bitmask)
    assert torch.isfinite(out[0, :32]).all() and torch.isinf(out[0, 32:]).all()
    assert unpack_token_bitmask(bitmask, 20).shape == (1, 20)


@pytest.mark.parametrize("vocab, rows, indices, words", [
    (1000, 4, None, None), (1000, 6, [5, 0, 2], None), (70, 3, [1], 2), (70, 2, None, 1)])
def test_xgrammar_kernel_equals_the_reference(vocab, rows, indices, words):
    """Including rows without a grammar (indices) and logits wider than the bitmask (words)."""
    generator = torch.Generator().manual_seed(vocab + rows)
    logits = torch.randn(rows, vocab, generator=generator)
    bitmask = _random_bitmask(rows if indices is None else len(indices), vocab, generator)
    bitmask = bitmask[:, :words].contiguous() if words else bitmask
    index = None if indices is None else torch.tensor(indices)
    assert torch.equal(xgrammar_apply_token_bitmask(logits, bitmask, index), apply_token_bitmask(logits, bitmask, index))
    half = logits.to(torch.bfloat16)                          # not fp32: handed to the reference
    assert torch.equal(xgrammar_apply_token_bitmask(half, bitmask, index), apply_token_bitmask(half, bitmask, index))


def test_op_is_registered_on_every_backend():
    registry = build_registry(("cpu", "cuda", "npu"))
    assert registry.select("apply_token_bitmask", "cpu").run is xgrammar_apply_token_bitmask
    for backend in ("cuda", "npu"):       # the CPU module's kernels as the reference fallback, which on
        kernel = registry.select("apply_token_bitmask", backend)     # a device tensor run plain torch
        assert kernel.name == f"{backend}.torch_reference.apply_token_bitmask"
        assert kernel.run in (xgrammar_apply_token_bitmask, apply_token_bitmask)
