"""MoE routing: top-k expert selection, token dispatch grouped by expert, weighted combine.

Scoring functions (as the models need them):
- "softmax" (Qwen2-MoE / Qwen3-MoE / ERNIE-4.5): probs = softmax(logits) in fp32; top-k by
  probs (+ `correction_bias`, ERNIE's `e_score_correction_bias`, which only ranks: the weights
  are the un-biased probs); `renormalize` divides the k weights by max(sum, norm_min).
- "sigmoid" (DeepSeek-V3 style): scores = sigmoid(logits), the same bias / renormalize rules.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SCORING_FUNCS = ("softmax", "sigmoid")


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    """How a FusedMoE layer turns router logits into (weights, expert ids)."""
    top_k: int
    scoring_func: str = "softmax"
    renormalize: bool = False
    norm_min: float = 0.0          # floor of the renormalizing sum (ERNIE's moe_norm_min)

    def __post_init__(self) -> None:
        if self.scoring_func not in SCORING_FUNCS:
            raise ValueError(f"scoring_func: {self.scoring_func!r} is not one of {SCORING_FUNCS}")
        if self.top_k < 1:
            raise ValueError(f"top_k: must be >= 1, got {self.top_k}")


def select_experts(router_logits: torch.Tensor, config: RoutingConfig,
                   correction_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (topk_weights fp32 [T, k], topk_ids int64 [T, k])."""
    num_experts = router_logits.shape[-1]
    if config.top_k > num_experts:
        raise ValueError(f"top_k {config.top_k} exceeds the number of experts {num_experts}")
    logits = router_logits.float()
    scores = logits.softmax(dim=-1) if config.scoring_func == "softmax" else logits.sigmoid()
    ranked = scores if correction_bias is None else scores + correction_bias.float().reshape(1, -1)
    _, topk_ids = torch.topk(ranked, config.top_k, dim=-1)                 # [T, k]
    topk_weights = scores.gather(1, topk_ids)                              # [T, k]
    if config.renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True).clamp_min(config.norm_min)
    return topk_weights, topk_ids


@dataclass(slots=True)
class Dispatch:
    """Token copies sorted by expert: row r of the sorted input is token `token_index[r]`."""
    token_index: torch.Tensor      # [T * k] int64, source token of each sorted row
    weights: torch.Tensor          # [T * k] fp32 routing weight of each sorted row
    group_list: torch.Tensor       # [E] int64 cumulative row end per expert


def dispatch(topk_weights: torch.Tensor, topk_ids: torch.Tensor, num_experts: int) -> Dispatch:
    """Group the T * k (token, expert) pairs by expert (stable: tokens keep their order)."""
    flat_ids = topk_ids.flatten()                                          # [T * k]
    order = torch.argsort(flat_ids, stable=True)                           # [T * k]
    counts = torch.bincount(flat_ids, minlength=num_experts)               # [E]
    return Dispatch(order // topk_ids.shape[1], topk_weights.flatten()[order],
                    counts.cumsum(0).to(torch.int64))


def combine(expert_out: torch.Tensor, plan: Dispatch, num_tokens: int) -> torch.Tensor:
    """expert_out [T * k, H] (sorted rows) -> sum over each token's k experts, weighted, [T, H]."""
    weighted = expert_out * plan.weights.to(expert_out.dtype)[:, None]     # [T * k, H]
    out = torch.zeros(num_tokens, expert_out.shape[1], dtype=expert_out.dtype, device=expert_out.device)
    return out.index_add_(0, plan.token_index, weighted)
