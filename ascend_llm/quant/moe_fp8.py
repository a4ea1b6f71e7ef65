"""Block-wise FP8 experts: FastDeploy's online `block_wise_fp8` and DeepSeek-style checkpoints
(`quant_method: fp8` + `weight_block_size`, `weight` e4m3 + `weight_scale_inv` per expert).

Per expert and projection: `weight` e4m3 [n, k], `weight_scale_inv` fp32 [ceil(n/bn), ceil(k/bk)]
(the dequant multiplier of each bn x bk block). gate and up keep their own block grids, stacked
([2 * ceil(I/bn), KB]), so a checkpoint's per-projection scales load unchanged and the online
path quantizes gate and up separately the same way. Activations: dynamic e4m3 per token per bk
channels (quantize_fp8_per_token_group); the CPU reference dequantizes both and multiplies in fp32.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ascend_llm.numerics import primitives as P
from ascend_llm.quant.moe_base import (ExpertParamSpec, FusedMoEMethodBase, add_expert_param,
                                       check_experts_loaded, declare_float_experts, dequant_grouped_matmul,
                                       run_experts)


def dequantize_block(q: torch.Tensor, scale_inv: torch.Tensor, block_size: tuple[int, int]) -> torch.Tensor:
    """`P.dequantize_fp8_block` (same values) through the exact e4m3 -> fp16 bit move, which is
    vectorised on CPU where torch's e4m3 -> float cast is not: q [n, k] -> fp32 [n, k]."""
    scale = P.expand_block_scale(scale_inv * P.FP8_FP16_RESCALE, tuple(q.shape), block_size)
    return P.fp8_to_float16_scaled(q).float() * scale


class BlockFp8MoEMethod(FusedMoEMethodBase):
    """e4m3 experts in (bn, bk) blocks; `online` quantizes float experts after loading."""

    def __init__(self, block_size: tuple[int, int] = (128, 128), online: bool = True) -> None:
        if len(block_size) != 2 or min(block_size) < 1:
            raise ValueError(f"weight_block_size: expected two positive ints, got {block_size}")
        self.block_size = (int(block_size[0]), int(block_size[1]))
        self.online = online

    def create_weights(self, layer: nn.Module, num_experts: int, hidden_size: int,
                       intermediate_size_per_partition: int, params_dtype: torch.dtype) -> None:
        layer.weight_block_size = self.block_size
        inter = intermediate_size_per_partition
        if self.online:
            declare_float_experts(layer, hidden_size, inter, params_dtype)
            return
        bn, bk = self.block_size
        add_expert_param(layer, "w13_weight", (2 * inter, hidden_size), P.FP8_DTYPE, ExpertParamSpec(n_dim=0))
        add_expert_param(layer, "w13_weight_scale_inv", (2 * P.num_blocks(inter, bn), P.num_blocks(hidden_size, bk)),
                         torch.float32, ExpertParamSpec(n_dim=0, n_block=bn))
        add_expert_param(layer, "w2_weight", (hidden_size, inter), P.FP8_DTYPE, ExpertParamSpec(k_dim=1))
        add_expert_param(layer, "w2_weight_scale_inv", (P.num_blocks(hidden_size, bn), P.num_blocks(inter, bk)),
                         torch.float32, ExpertParamSpec(k_dim=1, k_block=bk))

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        check_experts_loaded(layer)
        if self.online:
            self._quantize(layer)
        for proj in ("w13", "w2"):
            scale = getattr(layer, f"{proj}_weight_scale_inv").data
            if not bool(torch.isfinite(scale).all() and (scale > 0).all()):
                raise ValueError(f"{layer.prefix}: {proj} weight_scale_inv must be finite and > 0")

    def _quantize(self, layer: nn.Module) -> None:
        inter = layer.intermediate_size_per_partition
        for proj in ("w13", "w2"):
            weight = getattr(layer, f"{proj}_weight").data                       # [E, n, k] float
            parts = weight.split(inter, dim=1) if proj == "w13" else (weight,)   # gate, up
            qs, scales = [], []
            for expert in range(weight.shape[0]):
                pieces = [P.quantize_fp8_block(part[expert], self.block_size) for part in parts]
                qs.append(torch.cat([p[0] for p in pieces]))
                scales.append(torch.cat([p[1] for p in pieces]))
            setattr(layer, f"{proj}_weight", nn.Parameter(torch.stack(qs), requires_grad=False))
            setattr(layer, f"{proj}_weight_scale_inv", nn.Parameter(torch.stack(scales), requires_grad=False))

    def apply(self, layer: nn.Module, x: torch.Tensor, group_list: torch.Tensor) -> torch.Tensor:
        hidden, inter = layer.hidden_size, layer.intermediate_size_per_partition
        bn, bk = self.block_size

        def dequant(proj: str, e: int) -> torch.Tensor:                           # [n, k] fp32
            q, scale = getattr(layer, f"{proj}_weight")[e], getattr(layer, f"{proj}_weight_scale_inv")[e]
            if proj == "w2":
                return dequantize_block(q, scale, (bn, bk))
            half = scale.shape[0] // 2
            return torch.cat([dequantize_block(q[:inter], scale[:half], (bn, bk)),
                              dequantize_block(q[inter:], scale[half:], (bn, bk))])

        def gmm(a: torch.Tensor, proj: str, n: int) -> torch.Tensor:
            xq, sx = P.quantize_fp8_per_token_group(a, group_size=bk)            # dynamic per token
            a_deq = P.dequantize_fp8_per_token_group(xq, sx, group_size=bk).to(a.dtype)
            return dequant_grouped_matmul(a_deq, group_list, n, lambda e: dequant(proj, e))

        return run_experts(layer, x, group_list, lambda a: gmm(a, "w13", 2 * inter),
                           lambda a: gmm(a, "w2", hidden))
