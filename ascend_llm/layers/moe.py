"""FusedMoE: routed experts as one layer (route -> dispatch by expert -> grouped SwiGLU -> combine).

Checkpoint names: `{prefix}.{e}.{gate_proj|up_proj|down_proj}.{suffix}` (HF), or FastDeploy's
fused `{prefix}.{e}.up_gate_proj.{suffix}` (gate rows first, then up, along the output dim);
`prefix` is the layer's, e.g. `model.layers.3.mlp.experts`. The expert quantization method
(quant/moe_*.py) decides which suffixes exist and how the experts compute; tensor parallelism
splits the moe intermediate dim (the layer slices each checkpoint tensor with `layers.sharding`,
as the linear layers do): forward returns this rank's partial sum and
the caller all-reduces it (once per MoE block, together with any shared experts' partial sum).
"""
from __future__ import annotations

import math
import re
from typing import Callable

import torch
import torch.nn as nn

from ascend_llm.distributed.parallel_state import ParallelContext
from ascend_llm.layers.moe_routing import RoutingConfig, combine, dispatch, select_experts
from ascend_llm.ops import cpu
from ascend_llm.ops.registry import OpSet
from ascend_llm.quant.base import QuantConfig
from ascend_llm.layers.sharding import copy_checked, rank_slice
from ascend_llm.quant.moe_base import W13_SHARDS, FusedMoEMethodBase, UnquantizedFusedMoEMethod
from ascend_llm.quant.param_loading import as_param_dtype

EXPERT_TENSOR = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<expert>\d+)\."
                           r"(?P<proj>gate_proj|up_proj|down_proj|up_gate_proj)\.(?P<suffix>\w+)$")
_PROJ_SHARD = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")


class FusedMoE(nn.Module):
    """Routed experts of one decoder layer: forward(hidden [T, H], router_logits [T, E]) -> [T, H].

    Rank and size come from `parallel` when given (else tp_rank / tp_size); `parallel` is kept
    as the group online quantization max-reduces its scales over (`distributed.communication`).
    Under tensor parallelism the output is this rank's partial sum (no all-reduce here).
    """

    is_fused_moe = True          # how quant configs recognise the layer (no import cycle)

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 routing: RoutingConfig, params_dtype: torch.dtype = torch.float32,
                 quant_config: QuantConfig | None = None, prefix: str = "", ops: OpSet | None = None,
                 tp_rank: int = 0, tp_size: int = 1, layer_idx: int | None = None,
                 parallel: ParallelContext | None = None) -> None:
        super().__init__()
        if parallel is not None:
            tp_rank, tp_size = parallel.rank, parallel.world_size
        self.parallel = parallel
        if num_experts < 1 or routing.top_k > num_experts:
            raise ValueError(f"{prefix}: num_experts {num_experts} must be >= 1 and >= top_k {routing.top_k}")
        if intermediate_size % tp_size:
            raise ValueError(f"{prefix}: moe_intermediate_size {intermediate_size} is not divisible "
                             f"by tp_size {tp_size} (tensor_parallel_size)")
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"{prefix}: tp_rank {tp_rank} is not in [0, {tp_size})")
        self.num_experts, self.hidden_size, self.routing = num_experts, hidden_size, routing
        self.intermediate_size_per_partition = intermediate_size // tp_size
        self.tp_rank, self.tp_size, self.prefix, self.ops = tp_rank, tp_size, prefix, ops
        self.layer_idx = layer_idx if layer_idx is not None else _layer_index(prefix)
        self.silu_and_mul = ops.get("silu_and_mul") if ops is not None else cpu.silu_and_mul
        self.loaded_expert_tensors: set[tuple[str, int, str]] = set()     # (param, expert, shard)
        method = quant_config.get_quant_method(self, prefix) if quant_config is not None else None
        self.quant_method: FusedMoEMethodBase = method or UnquantizedFusedMoEMethod()
        self.quant_method.create_weights(self, num_experts, hidden_size,
                                         self.intermediate_size_per_partition, params_dtype)

    def forward(self, hidden: torch.Tensor, router_logits: torch.Tensor,
                correction_bias: torch.Tensor | None = None) -> torch.Tensor:
        topk_weights, topk_ids = select_experts(router_logits, self.routing, correction_bias)
        return self.experts_forward(hidden, topk_weights, topk_ids)

    def experts_forward(self, hidden: torch.Tensor, topk_weights: torch.Tensor,
                        topk_ids: torch.Tensor) -> torch.Tensor:
        """hidden [T, H], topk_weights [T, k], topk_ids [T, k] -> weighted sum of experts [T, H]."""
        plan = dispatch(topk_weights, topk_ids, self.num_experts)
        x = hidden.index_select(0, plan.token_index)                         # [T * k, H] by expert
        out = self.quant_method.apply(self, x, plan.group_list)              # [T * k, H]
        return combine(out, plan, hidden.shape[0])

    def load_checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> list[str]:
        """Load the expert tensor `name` (see module doc); returns the parameter names it filled."""
        match = EXPERT_TENSOR.match(name)
        if match is None or match["prefix"] != self.prefix:
            raise ValueError(f"{name}: not an expert tensor of {self.prefix}")
        expert, proj, suffix = int(match["expert"]), match["proj"], match["suffix"]
        if proj != "up_gate_proj":
            return [self.load_expert(suffix, _PROJ_SHARD[proj], expert, tensor, name)]
        param = getattr(self, f"w13_{suffix}", None)
        spec = getattr(param, "expert_spec", None)
        if spec is None or spec.n_dim is None:
            raise ValueError(f"{name}: unexpected expert tensor for {type(self.quant_method).__name__}")
        return [self.load_expert(suffix, shard, expert, half, name)
                for shard, half in zip(("w1", "w3"), _split_up_gate(tensor, spec.n_dim, name))]


    def load_expert(self, suffix: str, shard: str, expert: int, loaded: torch.Tensor,
                    ckpt_name: str) -> str:
        """Copy one checkpoint tensor (expert `expert`, shard w1/w3/w2) into its stacked parameter;
        returns the parameter name. ValueError naming `ckpt_name` for a bad expert id, dtype or shape."""
        name = f"{'w13' if shard in W13_SHARDS else 'w2'}_{suffix}"
        names = getattr(self, "expert_param_names", ())
        param = getattr(self, name, None) if name in names else None
        if param is None:
            known = sorted({n.split("_", 1)[1] for n in names})
            raise ValueError(f"{ckpt_name}: unexpected expert tensor for {type(self.quant_method).__name__} "
                             f"(expected suffixes {known})")
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"{ckpt_name}: expert id {expert} is out of range: the model config has "
                             f"num_experts={self.num_experts}")
        loaded = as_param_dtype(param, loaded, ckpt_name)
        dst, part = self._expert_slices(param, loaded, shard, expert, ckpt_name)
        copy_checked(dst, part, ckpt_name, " (this rank's part)")
        self.loaded_expert_tensors.add((name, expert, shard))
        return name

    def _expert_slices(self, param: nn.Parameter, loaded: torch.Tensor, shard: str, expert: int,
                       name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(this expert's part of param, this rank's slice of loaded): gate rows then up rows of
        w13 split along the output dim, w2 along its intermediate input dim."""
        spec = param.expert_spec
        dst = param.data[expert]
        if shard in W13_SHARDS:
            rows = math.ceil(self.intermediate_size_per_partition / spec.n_block)
            dst = dst.narrow(spec.n_dim, 0 if shard == "w1" else rows, rows)
            if self.tp_size > 1:
                loaded = rank_slice(loaded, dst, spec.n_dim, self.tp_rank, self.tp_size, name)
        elif spec.k_dim is not None and self.tp_size > 1:
            loaded = rank_slice(loaded, dst, spec.k_dim, self.tp_rank, self.tp_size, name)
        return dst, loaded


def _split_up_gate(tensor: torch.Tensor, dim: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """FastDeploy's fused [gate | up] tensor -> (gate, up), split along its output dim `dim`."""
    if tensor.dim() <= dim or tensor.shape[dim] % 2:
        raise ValueError(f"{name}: a fused up_gate_proj tensor needs an even output dim {dim}, got "
                         f"shape {tuple(tensor.shape)}")
    gate, up = tensor.chunk(2, dim=dim)
    return gate, up


def _layer_index(prefix: str) -> int | None:
    match = _LAYER_INDEX.search(prefix + ".")
    return int(match.group(1)) if match else None


def expert_loader(model: nn.Module) -> Callable[[str, torch.Tensor], list[str] | None]:
    """For `load_weights_into`: loads expert tensors into the model's FusedMoE layers and returns
    the full parameter names filled; None for tensors that are not expert tensors."""
    layers = {m.prefix: (name, m) for name, m in model.named_modules() if isinstance(m, FusedMoE)}

    def load(name: str, tensor: torch.Tensor) -> list[str] | None:
        match = EXPERT_TENSOR.match(name)
        if match is None:
            return None
        entry = layers.get(match["prefix"])
        if entry is None:
            raise ValueError(f"checkpoint tensor {name!r}: the model has no MoE layer "
                             f"{match['prefix']!r} (is the layer dense in config.json?)")
        module_name, layer = entry
        return [f"{module_name}.{p}" for p in layer.load_checkpoint_tensor(name, tensor)]
    return load
