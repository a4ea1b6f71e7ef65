"""msModelSlim W8A8_DYNAMIC experts (vllm-ascend's `w8a8_dynamic` MoE scheme).

Per expert and projection: `weight` int8 [n, k], `weight_scale` fp32 [n, 1], `weight_offset`
[n, 1] (zeros: symmetric). Activations: dynamic symmetric int8 per token (scale = rowmax|x|/127)
before gate/up, and again after SwiGLU before down (npu_dequant_swiglu_quant's quant_mode 1):

    y[t, n] = (sum_k q_x[t, k] * W_e[n, k]) * weight_scale_e[n] * token_scale[t]

Int32 accumulation is exact in fp32 here while k * 127 * 127 < 2**24 (k <= 1040); beyond that
the CPU reference rounds like any fp32 GEMM.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ascend_llm.ops import cpu_moe
from ascend_llm.ops.cpu_int8 import dynamic_quant_per_token_reference
from ascend_llm.quant.moe_base import (ExpertParamSpec, FusedMoEMethodBase, add_expert_param, bind_fused_experts,
                                       check_expert_scales, check_experts_loaded, run_fused_experts)

_PROJS = ("w13", "w2")


def int8_grouped_matmul(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                        group_list: torch.Tensor) -> torch.Tensor:
    """x [M, k] float -> per-token int8 -> per expert (q_x @ W_e.T) * scales -> [M, n] in x's dtype.

    weight: int8 [E, n, k]; weight_scale: fp32 [E, n].
    """
    q_x, token_scale = dynamic_quant_per_token_reference(x)                    # [M, k], [M]
    rows_scale = token_scale[:, None]

    def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
        return rows.float() @ weight[e].float().t() * weight_scale[e][None, :]

    out = cpu_moe.grouped_apply(q_x, group_list, weight.shape[1], expert, out_dtype=torch.float32)
    return (out * rows_scale).to(x.dtype)


class W8A8DynamicMoEMethod(FusedMoEMethodBase):
    """int8 per-channel expert weights, dynamic per-token int8 activations."""

    def create_weights(self, layer: nn.Module, num_experts: int, hidden_size: int,
                       intermediate_size_per_partition: int, params_dtype: torch.dtype) -> None:
        inter = intermediate_size_per_partition
        layer.params_dtype = params_dtype
        add_expert_param(layer, "w13_weight", (2 * inter, hidden_size), torch.int8, ExpertParamSpec(n_dim=0))
        add_expert_param(layer, "w2_weight", (hidden_size, inter), torch.int8, ExpertParamSpec(k_dim=1))
        for name in ("weight_scale", "weight_offset"):
            add_expert_param(layer, f"w13_{name}", (2 * inter, 1), torch.float32, ExpertParamSpec(n_dim=0))
            add_expert_param(layer, f"w2_{name}", (hidden_size, 1), torch.float32, ExpertParamSpec())

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        check_experts_loaded(layer)
        check_expert_scales(layer)
        for proj in _PROJS:
            if bool((getattr(layer, f"{proj}_weight_offset").data != 0).any()):
                raise ValueError(f"{layer.prefix}: {proj} weight_offset must be all 0 (W8A8_DYNAMIC "
                                 f"weights are symmetric)")
            scale = getattr(layer, f"{proj}_weight_scale").data                     # [E, n, 1]
            layer.register_buffer(f"{proj}_scale_fp32", scale[..., 0].float().contiguous(), persistent=False)
        bind_fused_experts(layer, scheme="w8a8_dynamic", dtype=layer.params_dtype)

    def apply(self, layer: nn.Module, x: torch.Tensor, group_list: torch.Tensor) -> torch.Tensor:
        out = run_fused_experts(layer, x, group_list)
        if out is not None:
            return out
        h = int8_grouped_matmul(x, layer.w13_weight, layer.w13_scale_fp32, group_list)       # [M, 2I]
        a = layer.silu_and_mul(h)                                                            # [M, I]
        return int8_grouped_matmul(a, layer.w2_weight, layer.w2_scale_fp32, group_list)      # [M, H]


def expert_quant_type(description: dict, prefix: str, num_experts: int, source: str) -> str:
    """The one quant type of every `{prefix}.{e}.{gate,up,down}_proj.weight` in a msModelSlim
    description (ValueError naming a missing entry or mixed types)."""
    types: dict[str, str] = {}
    for expert in range(num_experts):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            key = f"{prefix}.{expert}.{proj}.weight"
            if key not in description:
                raise ValueError(f"{prefix}: {key!r} is not in {source} (the model config has "
                                 f"num_experts={num_experts})")
            types[key] = description[key]
    if len(set(types.values())) != 1:
        raise ValueError(f"{prefix}: experts have different quant types {sorted(set(types.values()))}; "
                         f"all experts of a layer must share one")
    return next(iter(types.values()))


def w8a8_moe_method(description: dict, prefix: str, num_experts: int, source: str) -> FusedMoEMethodBase | None:
    """The expert method for a msModelSlim description: None (FLOAT) or W8A8_DYNAMIC."""
    quant_type = expert_quant_type(description, prefix, num_experts, source)
    if quant_type == "FLOAT":
        return None
    if quant_type == "W8A8_DYNAMIC":
        return W8A8DynamicMoEMethod()
    raise ValueError(f"{prefix}: quant type {quant_type!r} is not supported for MoE experts "
                     f"(supported: FLOAT, W8A8_DYNAMIC)")
