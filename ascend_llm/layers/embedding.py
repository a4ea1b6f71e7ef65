"""Token embedding and LM head, vocab-parallel under tensor parallelism.

Rank r holds vocab rows [r * V_r, (r + 1) * V_r) with V_r = ceil(vocab / tp_size); rows past the
vocabulary (last rank) stay zero. The embedding masks ids outside its range and all-reduces;
the LM head computes its vocab slice and all-gathers the full logits.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ascend_llm.distributed.parallel_state import ParallelContext
from ascend_llm.ops.registry import OpSet
from ascend_llm.quant.unquantized import UnquantizedLinearMethod


class VocabShard:
    """This rank's vocab rows: [start, start + size) of the padded vocabulary."""

    def __init__(self, vocab_size: int, parallel: ParallelContext | None) -> None:
        rank, tp_size = (parallel.rank, parallel.world_size) if parallel is not None else (0, 1)
        self.vocab_size = vocab_size
        self.size = -(-vocab_size // tp_size)
        self.start = rank * self.size
        self.parallel = parallel if tp_size > 1 else None

    def load_rows(self, param: torch.Tensor, loaded: torch.Tensor, name: str) -> None:
        """Copy this rank's rows of a full [vocab, hidden] checkpoint tensor into `param`."""
        if loaded.dim() != 2 or loaded.shape[0] != self.vocab_size or loaded.shape[1] != param.shape[1]:
            raise ValueError(f"{name}: checkpoint tensor has shape {tuple(loaded.shape)}, "
                             f"expected {(self.vocab_size, param.shape[1])}")
        rows = max(0, min(self.size, self.vocab_size - self.start))
        param[:rows].copy_(loaded[self.start:self.start + rows])
        param[rows:].zero_()


class VocabEmbedding(nn.Module):
    """input_ids [num_tokens] -> [num_tokens, hidden] (vocab-parallel with a `parallel` group)."""

    def __init__(self, vocab_size: int, hidden_size: int, params_dtype: torch.dtype,
                 parallel: ParallelContext | None = None, ops: OpSet | None = None) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.shard = VocabShard(vocab_size, parallel)
        self.weight = nn.Parameter(torch.empty(self.shard.size, hidden_size, dtype=params_dtype),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self._all_reduce = None
        if self.shard.parallel is not None:
            self._all_reduce = ops.get("all_reduce") if ops is not None else _collective("all_reduce")

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        self.shard.load_rows(param.data, loaded, "embed_tokens.weight")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self._all_reduce is None:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.shard.start                                   # [T]
        inside = (local >= 0) & (local < self.shard.size)                      # [T]
        out = F.embedding(local.masked_fill(~inside, 0), self.weight)          # [T, hidden]
        out = out.masked_fill(~inside.unsqueeze(-1), 0)
        return self._all_reduce(out, self.shard.parallel)


class LMHead(nn.Module):
    """hidden [num_tokens, hidden] -> fp32 logits [num_tokens, vocab]; may share the embedding.

    Runs through the backend's `linear` kernel like any float linear layer; when tied, the
    kernel is told the weight is shared so it keeps the embedding's dense layout (no copy).
    """

    def __init__(self, vocab_size: int, hidden_size: int, params_dtype: torch.dtype,
                 tied: VocabEmbedding | None = None, ops: OpSet | None = None,
                 parallel: ParallelContext | None = None) -> None:
        super().__init__()
        self.ops = ops
        self.prefix = "lm_head"
        self.shard = VocabShard(vocab_size, parallel)
        self.quant_method = UnquantizedLinearMethod()
        self.quant_method.create_weights(self, hidden_size, [self.shard.size], params_dtype)
        self.weight.weight_loader = self.weight_loader
        self.shared_weight = tied is not None
        if tied is not None:
            self.weight = tied.weight
        self._all_gather = None
        if self.shard.parallel is not None:
            self._all_gather = ops.get("all_gather") if ops is not None else _collective("all_gather")

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        check = getattr(param, "load_check", None)
        self.shard.load_rows(param.data, check(param, loaded, "lm_head.weight") if check else loaded, "lm_head.weight")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.quant_method.apply(self, hidden, None).float()           # [T, V_r]
        if self._all_gather is None:
            return logits
        full = self._all_gather(logits, self.shard.parallel, -1)               # [T, tp * V_r]
        return full[:, :self.shard.vocab_size]


def _collective(name: str):
    from ascend_llm.ops import collectives
    return getattr(collectives, name)
