"""Token embedding and LM head."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ascend_llm.ops.registry import OpSet
from ascend_llm.quant.unquantized import UnquantizedLinearMethod


class VocabEmbedding(nn.Module):
    """input_ids [num_tokens] -> [num_tokens, hidden]."""

    def __init__(self, vocab_size: int, hidden_size: int, params_dtype: torch.dtype) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size, dtype=params_dtype),
                                   requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    """hidden [num_tokens, hidden] -> fp32 logits [num_tokens, vocab]; may share the embedding.

    Runs through the backend's `linear` kernel like any float linear layer; when tied, the
    kernel is told the weight is shared so it keeps the embedding's dense layout (no copy).
    """

    def __init__(self, vocab_size: int, hidden_size: int, params_dtype: torch.dtype,
                 tied: VocabEmbedding | None = None, ops: OpSet | None = None) -> None:
        super().__init__()
        self.ops = ops
        self.quant_method = UnquantizedLinearMethod()
        self.quant_method.create_weights(self, hidden_size, [vocab_size], params_dtype)
        self.shared_weight = tied is not None
        if tied is not None:
            self.weight = tied.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, hidden, None).float()
