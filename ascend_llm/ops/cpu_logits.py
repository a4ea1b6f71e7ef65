"""Reference kernels for the ops that constrain a step's logits before sampling.

`apply_token_bitmask` is the grammar mask of structured outputs: bit j of a row's int32 words
(word j // 32, bit j % 32: xgrammar's layout) says whether token j may come next. The reference
is plain torch and device-agnostic, so `ops._REFERENCE_FALLBACK` also runs it on the NPU and CUDA
devices until those backends register their own kernels. On the CPU, xgrammar's C++ kernel
(`xgrammar_apply_token_bitmask`, same result, several times faster on a [16, 49152] batch) is
preferred; it hands anything but eager CPU fp32 logits to the reference.
"""
from __future__ import annotations

import torch
import xgrammar as xgr

from ascend_llm.ops.registry import Kernel, OpRegistry

_NEG_INF = float("-inf")
PRIORITY = 10     # xgrammar's kernel above the reference (0)


def unpack_token_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bitmask [num_rows, num_words] int32 -> allowed [num_rows, vocab_size] bool; ids past the
    bitmask's 32 * num_words columns are not allowed."""
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)            # [32]
    allowed = ((bitmask.unsqueeze(-1) >> bits) & 1).bool().flatten(1)           # [num_rows, words * 32]
    width = allowed.shape[1]
    if width >= vocab_size:
        return allowed[:, :vocab_size]
    pad = torch.zeros(allowed.shape[0], vocab_size - width, dtype=torch.bool, device=bitmask.device)
    return torch.cat([allowed, pad], dim=1)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor,
                        indices: torch.Tensor | None = None) -> torch.Tensor:
    """Logits with the disallowed tokens at -inf (a new tensor; `logits` is not modified).

    logits: [num_rows, vocab]; bitmask: [num_masked, num_words] int32; indices: [num_masked]
    int64, the logits row each bitmask row constrains (None: bitmask row i is logits row i).
    Rows not named in `indices` pass through unchanged.
    """
    num_rows, vocab_size = logits.shape
    disallowed = ~unpack_token_bitmask(bitmask.to(logits.device), vocab_size)    # [num_masked, vocab]
    if indices is None:
        return logits.masked_fill(disallowed, _NEG_INF)
    full = torch.zeros(num_rows, vocab_size, dtype=torch.bool, device=logits.device)
    full[indices.to(logits.device)] = disallowed
    return logits.masked_fill(full, _NEG_INF)


def xgrammar_apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor,
                                 indices: torch.Tensor | None = None) -> torch.Tensor:
    """`apply_token_bitmask` through xgrammar's CPU kernel (on a copy). xgrammar wants one bitmask
    row per logits row and leaves ids past the bitmask alone, so rows without a grammar get an
    all-allowed row and the ids past 32 * num_words are masked here."""
    if logits.device.type != "cpu" or logits.dtype != torch.float32 or torch.jit.is_tracing() \
            or torch.compiler.is_compiling():
        return apply_token_bitmask(logits, bitmask, indices)
    num_rows, vocab_size = logits.shape
    width = 32 * bitmask.shape[1]
    out = logits.clone()
    rows = list(range(num_rows)) if indices is None else indices.tolist()
    full = bitmask
    if indices is not None:
        full = torch.full((num_rows, bitmask.shape[1]), -1, dtype=torch.int32)   # [num_rows, num_words]
        full[indices] = bitmask
    xgr.apply_token_bitmask_inplace(out, full.contiguous(), vocab_size=min(vocab_size, width), indices=rows)
    if vocab_size > width:
        out[rows, width:] = _NEG_INF
    return out


def register(registry: OpRegistry) -> None:
    """This module's kernels on the CPU backend: the reference, and xgrammar's above it."""
    registry.register(Kernel("apply_token_bitmask", "cpu", "cpu.apply_token_bitmask", apply_token_bitmask))
    registry.register(Kernel("apply_token_bitmask", "cpu", "cpu.xgrammar_apply_token_bitmask",
                             xgrammar_apply_token_bitmask, priority=PRIORITY))
