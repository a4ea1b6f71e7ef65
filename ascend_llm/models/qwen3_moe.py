"""Qwen3-MoE (`Qwen3MoeForCausalLM`, transformers' modeling_qwen3_moe).

Like Qwen2-MoE without the shared expert; attention has per-head q/k RMSNorm before rotary and
`attention_bias` on all four projections.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ascend_llm.distributed.parallel_state import ParallelContext
from ascend_llm.models.moe_common import DenseMLP, MoEAttention, MoEForCausalLM, MoEModel, PartialSumReducer
from ascend_llm.models.qwen2_moe import is_sparse_layer, qwen_routed_experts
from ascend_llm.ops.registry import OpSet
from ascend_llm.quant.base import QuantConfig


class Qwen3MoeSparseBlock(nn.Module):
    """Router (replicated) and routed experts (partial sums all-reduced under tensor parallelism)."""

    def __init__(self, config: Any, ops: OpSet, quant_config: QuantConfig | None, prefix: str,
                 dtype: torch.dtype, layer_idx: int, parallel: ParallelContext) -> None:
        super().__init__()
        self.gate, self.experts = qwen_routed_experts(config, ops, quant_config, prefix, dtype, layer_idx,
                                                      parallel)
        self.reduce = PartialSumReducer(ops, parallel)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.reduce(self.experts(hidden, self.gate(hidden)))      # [T, H]


class Qwen3MoeForCausalLM(MoEForCausalLM):
    """Qwen3-MoE causal LM (30B-A3B / 235B-A22B layouts)."""

    def __init__(self, config: Any, ops: OpSet, quant_config: QuantConfig | None = None,
                 dtype: torch.dtype = torch.float32, parallel: ParallelContext | None = None) -> None:
        parallel = parallel or ParallelContext()
        if getattr(config, "use_sliding_window", False):
            raise ValueError("use_sliding_window: sliding-window attention is not supported yet")
        bias = bool(getattr(config, "attention_bias", False))

        def make_attn(i: int, prefix: str) -> nn.Module:
            return MoEAttention(config, ops, quant_config, prefix, dtype, (bias, bias), parallel,
                                qk_norm=True)

        def make_mlp(i: int, prefix: str) -> nn.Module:
            if is_sparse_layer(config, i):
                return Qwen3MoeSparseBlock(config, ops, quant_config, prefix, dtype, i, parallel)
            return DenseMLP(config.hidden_size, config.intermediate_size, ops, quant_config, prefix, dtype,
                            parallel)

        super().__init__(config, ops, dtype, MoEModel(config, ops, dtype, make_attn, make_mlp, parallel),
                         parallel)
