"""Qwen2-MoE (`Qwen2MoeForCausalLM`, transformers' modeling_qwen2_moe).

Attention: qkv bias per `qkv_bias` (default true), no o_proj bias. Layer i is sparse when it is
not in `mlp_only_layers` and (i + 1) % decoder_sparse_step == 0. Router: softmax probs, top-k,
renormalized only with `norm_topk_prob`. One shared expert (SwiGLU of
shared_expert_intermediate_size) scaled by sigmoid(shared_expert_gate(x)), added to the experts.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ascend_llm.layers.linear import ReplicatedLinear
from ascend_llm.layers.moe import FusedMoE
from ascend_llm.layers.moe_routing import RoutingConfig
from ascend_llm.distributed.parallel_state import ParallelContext
from ascend_llm.models.moe_common import DenseMLP, MoEAttention, MoEForCausalLM, MoEModel, PartialSumReducer
from ascend_llm.ops.registry import OpSet
from ascend_llm.quant.base import QuantConfig


def is_sparse_layer(config: Any, layer_idx: int) -> bool:
    """Qwen-MoE's rule: not in mlp_only_layers, experts exist, (i + 1) % decoder_sparse_step == 0."""
    return (layer_idx not in (getattr(config, "mlp_only_layers", None) or [])
            and config.num_experts > 0 and (layer_idx + 1) % config.decoder_sparse_step == 0)


def qwen_routed_experts(config: Any, ops: OpSet, quant_config: QuantConfig | None, prefix: str,
                        dtype: torch.dtype, layer_idx: int, parallel: ParallelContext
                        ) -> tuple[ReplicatedLinear, FusedMoE]:
    """(router gate (replicated), experts (this rank's intermediate slice)) of a Qwen-MoE block."""
    gate = ReplicatedLinear(config.hidden_size, config.num_experts, False, dtype, None,
                            f"{prefix}.gate", ops=ops)
    routing = RoutingConfig(config.num_experts_per_tok, "softmax", renormalize=bool(config.norm_topk_prob))
    experts = FusedMoE(config.num_experts, config.hidden_size, config.moe_intermediate_size, routing,
                       dtype, quant_config, f"{prefix}.experts", ops, layer_idx=layer_idx,
                       parallel=parallel)
    return gate, experts


class Qwen2MoeSparseBlock(nn.Module):
    """Router, routed experts, and the sigmoid-gated shared expert. Under tensor parallelism the
    experts and the shared expert leave partial sums; the per-token gate (replicated) scales the
    shared partial sum, so one all-reduce of their sum gives the full output."""

    def __init__(self, config: Any, ops: OpSet, quant_config: QuantConfig | None, prefix: str,
                 dtype: torch.dtype, layer_idx: int, parallel: ParallelContext) -> None:
        super().__init__()
        self.gate, self.experts = qwen_routed_experts(config, ops, quant_config, prefix, dtype, layer_idx,
                                                      parallel)
        self.shared_expert = DenseMLP(config.hidden_size, config.shared_expert_intermediate_size, ops,
                                      quant_config, f"{prefix}.shared_expert", dtype, parallel,
                                      reduce_results=False)
        self.shared_expert_gate = ReplicatedLinear(config.hidden_size, 1, False, dtype, None,
                                                   f"{prefix}.shared_expert_gate", ops=ops)
        self.reduce = PartialSumReducer(ops, parallel)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.experts(hidden, self.gate(hidden))                     # [T, H] partial
        shared = torch.sigmoid(self.shared_expert_gate(hidden)) * self.shared_expert(hidden)
        return self.reduce(out + shared)


class Qwen2MoeForCausalLM(MoEForCausalLM):
    """Qwen1.5-MoE / Qwen2-MoE causal LM."""

    def __init__(self, config: Any, ops: OpSet, quant_config: QuantConfig | None = None,
                 dtype: torch.dtype = torch.float32, parallel: ParallelContext | None = None) -> None:
        parallel = parallel or ParallelContext()
        if getattr(config, "use_sliding_window", False):
            raise ValueError("use_sliding_window: sliding-window attention is not supported yet")
        qkv_bias = bool(getattr(config, "qkv_bias", True))

        def make_attn(i: int, prefix: str) -> nn.Module:
            return MoEAttention(config, ops, quant_config, prefix, dtype, (qkv_bias, False), parallel)

        def make_mlp(i: int, prefix: str) -> nn.Module:
            if is_sparse_layer(config, i):
                return Qwen2MoeSparseBlock(config, ops, quant_config, prefix, dtype, i, parallel)
            return DenseMLP(config.hidden_size, config.intermediate_size, ops, quant_config, prefix, dtype,
                            parallel)

        super().__init__(config, ops, dtype, MoEModel(config, ops, dtype, make_attn, make_mlp, parallel),
                         parallel)
