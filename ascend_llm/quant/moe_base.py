"""Expert-weight quantization methods of FusedMoE layers: the interface, parameter declaration
with tensor-parallel sharding, completeness checks, and the float method.

A FusedMoE layer stores every expert tensor stacked over experts, [E, ...]. Checkpoints hold one
tensor per expert and projection: gate_proj (shard "w1") and up_proj ("w3") are concatenated
along their output dim into `w13_<suffix>`, down_proj ("w2") is `w2_<suffix>`. Tensor parallelism
splits the moe intermediate dim I: each rank keeps rows [rank * I/tp, (rank + 1) * I/tp) of the
gate and up outputs and the same columns of down's input, so the down-projection outputs of all
ranks sum (all-reduce) to the unsharded result. Every parameter records where those dims are
(`ExpertParamSpec`) in its per-expert checkpoint layout, and in how many rows per stored row
(packed int4 bytes: 2, WINT2 bytes: 4, 128-row scale blocks: 128); the layer
(`layers.moe.FusedMoE.load_expert`) slices and copies each checkpoint tensor accordingly.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from ascend_llm.ops import cpu_moe

logger = logging.getLogger(__name__)

W13_SHARDS = ("w1", "w3")
FUSED_EXPERTS_OP = "fused_experts"      # a backend's whole quantized SwiGLU expert block
SHARD_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


@dataclass(frozen=True, slots=True)
class ExpertParamSpec:
    """Dims of one per-expert tensor: n_dim = the gate/up output dim (w13 only), k_dim = the
    intermediate input dim of down (w2 only; None: not split by TP); *_block = rows per stored row."""
    n_dim: int | None = None
    n_block: int = 1
    k_dim: int | None = None
    k_block: int = 1


class FusedMoEMethodBase(ABC):
    """Declares a FusedMoE layer's expert tensors, post-processes them, and runs the experts.

    State lives on the layer. apply(layer, x, group_list): x [M, hidden] rows sorted by expert,
    group_list [E] cumulative row ends -> [M, hidden] = down(silu(gate(x)) * up(x)) per expert.
    """

    @abstractmethod
    def create_weights(self, layer: nn.Module, num_experts: int, hidden_size: int,
                       intermediate_size_per_partition: int, params_dtype: torch.dtype) -> None:
        """Register the stacked expert parameters (with `add_expert_param`)."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Check every expert tensor arrived; quantize / re-layout; bind kernels."""
        check_experts_loaded(layer)

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, group_list: torch.Tensor) -> torch.Tensor:
        """x [M, hidden] sorted by expert -> [M, hidden]."""


def add_expert_param(layer: nn.Module, name: str, shape: tuple[int, ...], dtype: torch.dtype,
                     spec: ExpertParamSpec) -> nn.Parameter:
    """Register `name` = zeros [E, *shape] on `layer`; `shape` is one expert's (per-rank) shape."""
    if not (name.startswith("w13_") or name.startswith("w2_")):
        raise ValueError(f"expert parameter {name!r}: names start with 'w13_' or 'w2_'")
    blocks = [spec.n_block] if name.startswith("w13_") else ([spec.k_block] if spec.k_dim is not None else [])
    for block in blocks:
        if layer.tp_size > 1 and layer.intermediate_size_per_partition % block:
            raise ValueError(f"{layer.prefix}.{name}: tensor parallelism needs the per-rank moe "
                             f"intermediate size ({layer.intermediate_size_per_partition}) to be a "
                             f"multiple of {block} (rows per stored row of this tensor)")
    param = nn.Parameter(torch.zeros((layer.num_experts, *shape), dtype=dtype), requires_grad=False)
    param.expert_spec = spec
    layer.register_parameter(name, param)
    layer.expert_param_names = (*getattr(layer, "expert_param_names", ()), name)
    return param


def check_experts_loaded(layer: nn.Module) -> None:
    """ValueError naming the first expert checkpoint tensor that was never loaded."""
    loaded = getattr(layer, "loaded_expert_tensors", set())
    for name in layer.expert_param_names:
        kind, suffix = name.split("_", 1)
        for expert in range(layer.num_experts):
            for shard in (W13_SHARDS if kind == "w13" else ("w2",)):
                if (name, expert, shard) not in loaded:
                    missing = f"{layer.prefix}.{expert}.{SHARD_PROJ[shard]}.{suffix}"
                    raise ValueError(f"checkpoint is missing tensor {missing!r} (needed by "
                                     f"{layer.prefix}, {layer.num_experts} experts)")


def check_expert_scales(layer: nn.Module) -> None:
    """ValueError naming the layer when a w13 / w2 `weight_scale` is negative or not finite."""
    for proj in ("w13", "w2"):
        scale = getattr(layer, f"{proj}_weight_scale").data
        if not bool(torch.isfinite(scale).all() and (scale >= 0).all()):
            raise ValueError(f"{layer.prefix}: {proj} weight_scale must be finite and >= 0")


def run_experts(layer: nn.Module, x: torch.Tensor, group_list: torch.Tensor,
                gate_up: Callable[[torch.Tensor], torch.Tensor],
                down: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """down(silu_and_mul(gate_up(x))): x [M, H] -> [M, 2I] -> [M, I] -> [M, H]."""
    return down(layer.silu_and_mul(gate_up(x)))


def bind_fused_experts(layer: nn.Module, **traits: object) -> None:
    """Select the backend's `fused_experts` kernel for `traits` (scheme, dtype, bits, sizes), let it
    re-lay the expert weights (`prepare`) and keep it as `layer.fused_experts`; None keeps the
    plain-torch reference path (CPU ops, or no kernel supports the traits: the reason is logged)."""
    layer.fused_experts = None
    ops = getattr(layer, "ops", None)
    if ops is None or (FUSED_EXPERTS_OP, ops.backend) not in ops.registry.kernels:
        return
    traits = {"hidden_size": layer.hidden_size, "intermediate_size": layer.intermediate_size_per_partition,
              **traits}
    try:
        kernel = ops.bind(layer, FUSED_EXPERTS_OP, **traits)
    except ValueError as reason:
        logger.info("%s: quantized experts run the reference path on backend %s: %s",
                    layer.prefix, ops.backend, reason)
        return
    kernel.prepare(layer)
    layer.fused_experts = kernel.run


def run_fused_experts(layer: nn.Module, x: torch.Tensor, group_list: torch.Tensor) -> torch.Tensor | None:
    """The bound backend kernel's output [M, hidden], or None when the layer has none."""
    kernel = getattr(layer, "fused_experts", None)
    return None if kernel is None else kernel(layer, x, group_list)


def dequant_grouped_matmul(x: torch.Tensor, group_list: torch.Tensor, out_features: int,
                           dequant_expert: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """Per active expert e: x_rows @ dequant_expert(e).T in fp32 (dequant_expert(e): [n, k] fp32)."""
    return cpu_moe.grouped_apply(
        x, group_list, out_features,
        lambda e, rows: (rows.float() @ dequant_expert(e).t()).to(x.dtype))


def declare_float_experts(layer: nn.Module, hidden_size: int, intermediate: int,
                          params_dtype: torch.dtype) -> None:
    """w13_weight [E, 2I, H] and w2_weight [E, H, I] in the model dtype (checkpoint layout)."""
    add_expert_param(layer, "w13_weight", (2 * intermediate, hidden_size), params_dtype,
                     ExpertParamSpec(n_dim=0))
    add_expert_param(layer, "w2_weight", (hidden_size, intermediate), params_dtype,
                     ExpertParamSpec(k_dim=1))


class UnquantizedFusedMoEMethod(FusedMoEMethodBase):
    """Float experts through the backend's `grouped_matmul` (weights re-laid out to [E, k, n])."""

    def create_weights(self, layer: nn.Module, num_experts: int, hidden_size: int,
                       intermediate_size_per_partition: int, params_dtype: torch.dtype) -> None:
        declare_float_experts(layer, hidden_size, intermediate_size_per_partition, params_dtype)
        layer.grouped_matmul = cpu_moe.grouped_matmul

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        check_experts_loaded(layer)
        # [E, n, k] -> [E, k, n]: what npu_grouped_matmul and the other kernels take
        layer.w13_weight = nn.Parameter(layer.w13_weight.data.transpose(1, 2).contiguous(), requires_grad=False)
        layer.w2_weight = nn.Parameter(layer.w2_weight.data.transpose(1, 2).contiguous(), requires_grad=False)
        ops = getattr(layer, "ops", None)
        if ops is not None:
            kernel = ops.bind(layer, "grouped_matmul", dtype=layer.w13_weight.dtype)
            kernel.prepare(layer)
            layer.grouped_matmul = kernel.run

    def apply(self, layer: nn.Module, x: torch.Tensor, group_list: torch.Tensor) -> torch.Tensor:
        gmm = layer.grouped_matmul
        return run_experts(layer, x, group_list, lambda a: gmm(a, layer.w13_weight, group_list),
                           lambda a: gmm(a, layer.w2_weight, group_list))
