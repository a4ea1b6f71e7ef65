"""Reference kernels for the ops that constrain a step's logits before sampling.

`apply_token_bitmask` is the grammar mask of structured outputs: bit j of a row's int32 words
(little-endian within each word, word j // 32, bit j % 32: xgrammar's layout) says whether token
j may come next. It is plain torch and device-agnostic, so `ops._REFERENCE_FALLBACK` also runs
it on the NPU and CUDA devices until those backends register their own kernels.
"""
from __future__ import annotations

import torch

from ascend_llm.ops.registry import Kernel, OpRegistry

_NEG_INF = float("-inf")


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


def register(registry: OpRegistry) -> None:
    """The reference kernels of this module, on the CPU backend."""
    registry.register(Kernel("apply_token_bitmask", "cpu", "cpu.apply_token_bitmask", apply_token_bitmask))
