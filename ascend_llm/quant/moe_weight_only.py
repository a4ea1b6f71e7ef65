"""Weight-only expert methods: online wint8 / wint4 (FastDeploy semantics, per expert), the
pre-quantized wint8 / wint4 expert layout, and FastDeploy WINT2 experts (w4w2 checkpoints).

Per expert and projection the tensors follow the dense layouts (quant/weight_only.py,
numerics/wint2.py): wint8 `weight` int8 [n, k] + `weight_scale` [n]; wint4 `weight` uint8
[n, ceil(k/2)] (low nibble = even k) + `weight_scale` [n]; WINT2 `quant_weight` [k/4, n],
`weight_scale` [ceil(k/128), n], `super_scales` / `code_scale` / `code_zp` [n]. Experts compute
on the rows routed to them only: int8 / int4 as (x @ q.T) * scale, WINT2 by decoding each active
expert's weight to fp32 (the CPU reference; other backends run it on their device).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ascend_llm.distributed.communication import group_max, is_tensor_parallel
from ascend_llm.numerics import primitives as P
from ascend_llm.numerics import wint2 as L
from ascend_llm.ops import cpu_moe
from ascend_llm.quant.moe_base import (ExpertParamSpec, FusedMoEMethodBase, add_expert_param,
                                       bind_fused_experts, check_expert_scales, check_experts_loaded,
                                       declare_float_experts,
                                       dequant_grouped_matmul, run_experts, run_fused_experts)

_PROJS = ("w13", "w2")


def int_expert_matmul(layer: nn.Module, proj: str) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """(e, rows [m, k]) -> (rows @ q_e.T) * scale_e in fp32, cast to rows' dtype: the scale applied
    to the [m, n] output; int4 multiplies even-k inputs by the low nibbles and odd-k inputs by
    the high ones (no re-interleave, as `cpu_quant.weight_only_matmul_split`)."""
    weight, scale = getattr(layer, f"{proj}_weight"), getattr(layer, f"{proj}_weight_scale")
    k = layer.expert_k[proj]

    def run(e: int, rows: torch.Tensor) -> torch.Tensor:
        xf = rows.float()
        if layer.quant_bits == 4:
            low, high = P.unpack_int4_halves(weight[e])                     # [n, ceil(k/2)] each
            y = F.linear(xf[:, 0::2], low.float()) + F.linear(xf[:, 1::2], high[:, :k // 2].float())
        else:
            y = F.linear(xf, weight[e].float())                             # [m, n]
        return (y * scale[e].float()).to(rows.dtype)
    return run


def apply_int_experts(layer: nn.Module, x: torch.Tensor, group_list: torch.Tensor) -> torch.Tensor:
    """SwiGLU experts with int8 / int4 per-channel weights (only experts with rows run): the
    backend's `fused_experts` kernel when one was bound, else the reference below."""
    out = run_fused_experts(layer, x, group_list)
    if out is not None:
        return out
    hidden, inter = layer.hidden_size, layer.intermediate_size_per_partition
    return run_experts(
        layer, x, group_list,
        lambda a: cpu_moe.grouped_apply(a, group_list, 2 * inter, int_expert_matmul(layer, "w13")),
        lambda a: cpu_moe.grouped_apply(a, group_list, hidden, int_expert_matmul(layer, "w2")))


class OnlineWeightOnlyMoEMethod(FusedMoEMethodBase):
    """`--quantization wint8|wint4`: float experts load, then quantize per expert per channel."""

    def __init__(self, bits: int) -> None:
        P.int_qmax(bits)
        self.bits = bits

    def create_weights(self, layer: nn.Module, num_experts: int, hidden_size: int,
                       intermediate_size_per_partition: int, params_dtype: torch.dtype) -> None:
        declare_float_experts(layer, hidden_size, intermediate_size_per_partition, params_dtype)
        layer.quant_bits, layer.params_dtype = self.bits, params_dtype
        layer.expert_k = {"w13": hidden_size, "w2": intermediate_size_per_partition}

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        check_experts_loaded(layer)
        for proj in _PROJS:
            weight = getattr(layer, f"{proj}_weight").data                    # [E, n, k] float
            if not weight.is_floating_point():
                raise ValueError(f"{layer.prefix}.{proj}_weight: already quantized ({weight.dtype})")
            num_experts, n, k = weight.shape
            q, scale = _quantize_experts_per_channel(layer, weight.reshape(num_experts * n, k), self.bits,
                                                     split_k=proj == "w2")
            if self.bits == 4:
                q = P.pack_int4(q)                                            # [E * n, ceil(k/2)]
            setattr(layer, f"{proj}_weight", nn.Parameter(q.view(num_experts, n, -1), requires_grad=False))
            setattr(layer, f"{proj}_weight_scale",
                    nn.Parameter(scale.view(num_experts, n), requires_grad=False))
        bind_fused_experts(layer, scheme="weight_only", bits=self.bits, dtype=layer.params_dtype)

    def apply(self, layer: nn.Module, x: torch.Tensor, group_list: torch.Tensor) -> torch.Tensor:
        return apply_int_experts(layer, x, group_list)


def _quantize_experts_per_channel(layer: nn.Module, weight: torch.Tensor, bits: int,
                                  split_k: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`P.quantize_per_channel` of weight [rows, k]; when k is this rank's slice of the moe
    intermediate dim (down, `split_k`) under tensor parallelism the scales are max-reduced over
    the group, so every rank's codes equal TP=1's slice (as quantize_per_channel_tp)."""
    q, scale = P.quantize_per_channel(weight, bits)                       # [rows, k], [rows]
    if not (split_k and is_tensor_parallel(layer)):
        return q, scale
    scale = group_max(layer, scale)             # amax -> scale is monotonic: max of scales
    qmax = P.int_qmax(bits)
    q = torch.round(weight.float() / scale[:, None]).clamp_(-qmax, qmax).to(torch.int8)
    return q, scale


class PrequantWeightOnlyMoEMethod(FusedMoEMethodBase):
    """Pre-quantized wint8 / wint4 experts (`weight` + `weight_scale` [n] per expert/projection),
    row-major only (`is_permuted: false`): FastDeploy's CUTLASS expert layout is refused."""

    def __init__(self, bits: int, permuted: bool = False) -> None:
        P.int_qmax(bits)
        self.bits, self.permuted = bits, permuted

    def create_weights(self, layer: nn.Module, num_experts: int, hidden_size: int,
                       intermediate_size_per_partition: int, params_dtype: torch.dtype) -> None:
        if self.permuted:
            raise ValueError(f"{layer.prefix}: pre-quantized wint{self.bits} MoE experts in FastDeploy's "
                             f"CUTLASS layout (quantization_config.is_permuted true, FastDeploy's "
                             f"default) are not read; experts written row-major load with "
                             f"is_permuted: false")
        inter, pack = intermediate_size_per_partition, 2 if self.bits == 4 else 1
        dtype = torch.uint8 if self.bits == 4 else torch.int8
        add_expert_param(layer, "w13_weight", (2 * inter, -(-hidden_size // pack)), dtype, ExpertParamSpec(n_dim=0))
        add_expert_param(layer, "w13_weight_scale", (2 * inter,), torch.float32, ExpertParamSpec(n_dim=0))
        add_expert_param(layer, "w2_weight", (hidden_size, -(-inter // pack)), dtype,
                         ExpertParamSpec(k_dim=1, k_block=pack))
        add_expert_param(layer, "w2_weight_scale", (hidden_size,), torch.float32, ExpertParamSpec())
        layer.quant_bits, layer.params_dtype = self.bits, params_dtype
        layer.expert_k = {"w13": hidden_size, "w2": inter}

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        check_experts_loaded(layer)
        check_expert_scales(layer)
        for proj in _PROJS:
            if self.bits == 8 and bool((getattr(layer, f"{proj}_weight").data == -128).any()):
                raise ValueError(f"{layer.prefix}: {proj} weight has int8 code -128; symmetric wint8 "
                                 f"uses [-127, 127] (a +128-biased CUTLASS layout?)")
        bind_fused_experts(layer, scheme="weight_only", bits=self.bits, dtype=layer.params_dtype)

    def apply(self, layer: nn.Module, x: torch.Tensor, group_list: torch.Tensor) -> torch.Tensor:
        return apply_int_experts(layer, x, group_list)


class WInt2MoEMethod(FusedMoEMethodBase):
    """FastDeploy WINT2 experts (the w2 layer range of a `w4w2` checkpoint)."""

    def create_weights(self, layer: nn.Module, num_experts: int, hidden_size: int,
                       intermediate_size_per_partition: int, params_dtype: torch.dtype) -> None:
        inter = intermediate_size_per_partition
        layer.params_dtype = params_dtype
        for proj, k, n in (("w13", hidden_size, 2 * inter), ("w2", inter, hidden_size)):
            shapes = L.expected_shapes(k, n)
            split = proj == "w2"                 # down's k (the intermediate dim) is TP-split
            for name, block in (("quant_weight", L.PACK), ("weight_scale", 2 * L.GROUP_SIZE)):
                spec = (ExpertParamSpec(k_dim=0, k_block=block) if split else ExpertParamSpec(n_dim=1))
                add_expert_param(layer, f"{proj}_{name}", shapes[name], torch.uint8, spec)
            vector_spec = ExpertParamSpec() if split else ExpertParamSpec(n_dim=0)
            add_expert_param(layer, f"{proj}_super_scales", (n,), params_dtype, vector_spec)
            add_expert_param(layer, f"{proj}_code_scale", (n,), torch.float32, vector_spec)
            add_expert_param(layer, f"{proj}_code_zp", (n,), torch.float32, vector_spec)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        check_experts_loaded(layer)
        for proj in _PROJS:
            for name in ("super_scales", "code_scale", "code_zp"):
                if not bool(torch.isfinite(getattr(layer, f"{proj}_{name}").data.float()).all()):
                    raise ValueError(f"{layer.prefix}: {proj} {name} must be finite")
        # no backend kernel takes WINT2 codes: binding only logs why the reference path runs
        bind_fused_experts(layer, scheme="weight_only", bits=2, dtype=layer.params_dtype)

    def apply(self, layer: nn.Module, x: torch.Tensor, group_list: torch.Tensor) -> torch.Tensor:
        hidden, inter = layer.hidden_size, layer.intermediate_size_per_partition

        def dequant(proj: str, e: int) -> torch.Tensor:                      # [n, k] fp32
            return L.dequantize_wint2(*(getattr(layer, f"{proj}_{name}")[e] for name in L.TENSOR_NAMES))

        return run_experts(
            layer, x, group_list,
            lambda a: dequant_grouped_matmul(a, group_list, 2 * inter, lambda e: dequant("w13", e)),
            lambda a: dequant_grouped_matmul(a, group_list, hidden, lambda e: dequant("w2", e)))


def w4w2_method(quant_type: str, permuted: bool = False) -> FusedMoEMethodBase:
    """The expert method of a w4w2 layer range: 'wint4' (pre-quantized; `permuted`: its stored
    layout, see PrequantWeightOnlyMoEMethod) or 'wint2'."""
    if quant_type == "wint4":
        return PrequantWeightOnlyMoEMethod(4, permuted)
    if quant_type == "wint2":
        return WInt2MoEMethod()
    raise ValueError(f"moe_quant_config: quant_type {quant_type!r} is not wint4 / wint2")
