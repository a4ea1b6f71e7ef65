"""Which HF architectures the calibrator handles, and how their Linears group.

A group is the set of Linears that read the same input tensor and that the runtime fuses into
one layer (q/k/v -> qkv_proj, gate/up -> gate_up_proj). Members of a group share one activation
range (one quantization of the input, as on the NPU) and one quant type (the runtime requires
every shard of a fused layer to have the same type).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from calib.config import CalibError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")
# per decoder layer: (group name, member suffixes)
LAYER_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("self_attn.qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.o_proj", ("self_attn.o_proj",)),
    ("mlp.gate_up", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.down_proj", ("mlp.down_proj",)),
)


@dataclass(frozen=True)
class LinearGroup:
    """Linears (full module names) reading one input; `key` names the group."""

    key: str
    names: tuple[str, ...]
    layer_index: int


def check_architecture(config: Any, source: str, rotation: str | None = None) -> str:
    """The supported architecture named in `config`, else CalibError listing the supported ones;
    with `rotation` the error says why that architecture cannot be rotated."""
    architectures = list(getattr(config, "architectures", None) or [])
    for arch in architectures:
        if arch in SUPPORTED_ARCHITECTURES:
            return arch
    named = architectures or "(none in config.json)"
    if rotation:
        raise CalibError(f"{source}: --rotation {rotation}: cannot rotate architecture {named}: "
                         f"{_why_not_rotatable(config)}; the rotation is implemented for "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)} (a dense gated MLP in every decoder layer, "
                         f"whose mlp.down_proj input is smoothed from mlp.up_proj and rotated)")
    raise CalibError(f"{source}: unsupported architecture {named}; "
                     f"the calibrator supports {', '.join(SUPPORTED_ARCHITECTURES)}")


def _why_not_rotatable(config: Any) -> str:
    moe = [k for k in ("num_experts", "num_local_experts", "moe_num_experts", "n_routed_experts")
           if getattr(config, k, None)]
    if moe:
        return (f"its MLPs are mixtures of experts ({moe[0]}={getattr(config, moe[0])}): neither this calibrator "
                f"nor the runtime rotates an expert's down_proj input (the runtime refuses 'online_hadamard' "
                f"on fused MoE experts)")
    return "the calibrator does not handle this architecture at all (its Linear layout is unknown to it)"


def find_groups(model: nn.Module) -> list[LinearGroup]:
    """Every decoder-layer Linear group of an HF Llama / Qwen2 model, in execution order."""
    modules = dict(model.named_modules())
    groups = []
    for index in range(model.config.num_hidden_layers):
        prefix = f"model.layers.{index}"
        for key, suffixes in LAYER_GROUPS:
            names = tuple(f"{prefix}.{s}" for s in suffixes)
            missing = [n for n in names if not isinstance(modules.get(n), nn.Linear)]
            if missing:
                raise CalibError(f"model has no Linear {missing[0]!r}; unexpected layout for "
                                 f"{', '.join(SUPPORTED_ARCHITECTURES)}")
            groups.append(LinearGroup(f"{prefix}.{key}", names, index))
    return groups


def group_of(groups: list[LinearGroup]) -> dict[str, LinearGroup]:
    """Linear name -> its group."""
    return {name: group for group in groups for name in group.names}
