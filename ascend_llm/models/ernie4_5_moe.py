"""ERNIE-4.5 MoE in the HF "-PT" format (`Ernie4_5_MoeForCausalLM`).

Differences from Qwen-MoE that matter here (transformers' modeling_ernie4_5_moe): GPT-J style
interleaved rotary; `use_bias` on every projection; MoE on layers i with (i + 1) % interval == 0
and start <= i <= end; an fp32 router with softmax probs, top-k ranked on probs +
`moe_statics.e_score_correction_bias`, weights = the un-biased probs / max(sum, moe_norm_min);
`moe_num_shared_experts` shared experts (one SwiGLU MLP of moe_intermediate_size * n) added
unweighted. Multi-token-prediction tensors (`model.mtp_*`) are skipped, as transformers does.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn as nn

from ascend_llm.layers.linear import ReplicatedLinear
from ascend_llm.layers.moe import FusedMoE
from ascend_llm.layers.moe_routing import RoutingConfig
from ascend_llm.distributed.parallel_state import ParallelContext
from ascend_llm.models.moe_common import DenseMLP, MoEAttention, MoEForCausalLM, MoEModel, PartialSumReducer
from ascend_llm.ops.registry import OpSet
from ascend_llm.quant.base import QuantConfig


def is_moe_layer(config: Any, layer_idx: int) -> bool:
    """ERNIE's rule: (i + 1) % moe_layer_interval == 0 and start <= i <= end (end -1: last)."""
    end = config.moe_layer_end_index
    end = config.num_hidden_layers - 1 if end is None or end < 0 else end
    return ((layer_idx + 1) % config.moe_layer_interval == 0
            and config.moe_layer_start_index <= layer_idx <= end)


class MoeStatics(nn.Module):
    """Holds `e_score_correction_bias` [1, E] (fp32), which biases top-k ranking only."""

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.e_score_correction_bias = nn.Parameter(torch.zeros(1, num_experts, dtype=torch.float32),
                                                    requires_grad=False)


class Ernie4_5_MoeSparseBlock(nn.Module):
    """fp32 router (replicated), biased top-k, routed experts plus the shared experts; under
    tensor parallelism both are this rank's partial sums, all-reduced once."""

    def __init__(self, config: Any, ops: OpSet, quant_config: QuantConfig | None, prefix: str,
                 dtype: torch.dtype, layer_idx: int, parallel: ParallelContext) -> None:
        super().__init__()
        num_experts = config.moe_num_experts
        self.gate = ReplicatedLinear(config.hidden_size, num_experts, False, torch.float32, None,
                                     f"{prefix}.gate", ops=ops)
        self.moe_statics = MoeStatics(num_experts)
        routing = RoutingConfig(config.moe_k, "softmax", renormalize=True, norm_min=config.moe_norm_min)
        self.experts = FusedMoE(num_experts, config.hidden_size, config.moe_intermediate_size, routing,
                                dtype, quant_config, f"{prefix}.experts", ops, layer_idx=layer_idx,
                                parallel=parallel)
        shared = config.moe_num_shared_experts or 0
        self.shared_experts = (DenseMLP(config.hidden_size, config.moe_intermediate_size * shared, ops,
                                        quant_config, f"{prefix}.shared_experts", dtype, parallel,
                                        config.use_bias, reduce_results=False)
                               if shared > 0 else None)
        self.reduce = PartialSumReducer(ops, parallel)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        router_logits = self.gate(hidden.float())                          # [T, E] fp32
        out = self.experts(hidden, router_logits, self.moe_statics.e_score_correction_bias)  # [T, H]
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden)
        return self.reduce(out)


class Ernie4_5_MoeForCausalLM(MoEForCausalLM):
    """ERNIE-4.5 MoE causal LM (A3B / A47B layouts; tiny random configs in the tests)."""

    def __init__(self, config: Any, ops: OpSet, quant_config: QuantConfig | None = None,
                 dtype: torch.dtype = torch.float32, parallel: ParallelContext | None = None) -> None:
        parallel = parallel or ParallelContext()
        bias = bool(getattr(config, "use_bias", False))

        def make_attn(i: int, prefix: str) -> nn.Module:
            return MoEAttention(config, ops, quant_config, prefix, dtype, (bias, bias), parallel,
                                interleaved_rope=True)

        def make_mlp(i: int, prefix: str) -> nn.Module:
            if is_moe_layer(config, i):
                return Ernie4_5_MoeSparseBlock(config, ops, quant_config, prefix, dtype, i, parallel)
            return DenseMLP(config.hidden_size, config.intermediate_size, ops, quant_config, prefix, dtype,
                            parallel, bias)

        super().__init__(config, ops, dtype, MoEModel(config, ops, dtype, make_attn, make_mlp, parallel),
                         parallel)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """As the base class, without the MTP head's tensors (not used for decoding here)."""
        return super().load_weights((name, t) for name, t in weights if not is_mtp_tensor(name))


def is_mtp_tensor(name: str) -> bool:
    """ERNIE's multi-token-prediction block (`model.mtp_block.0...`, `model.mtp_emb_norm...`)."""
    return any(part.startswith("mtp") for part in name.split("."))
