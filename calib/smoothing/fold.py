"""Smoothing groups of a decoder and the exact folds of a scale (and shift) into their weights.

A group is a producer followed by the Linears that read its output:
- `input_layernorm` -> q/k/v_proj and `post_attention_layernorm` -> gate/up_proj (norm groups);
- `v_proj` rows -> `o_proj` columns (through attention: softmax rows sum to 1 and heads do not mix
  channels, so a per-channel scale of v comes out unchanged on the matching o_proj input channels);
- `up_proj` rows -> `down_proj` columns (act(gate) * up is linear in up, channel by channel).
Folding a scale s [c] divides the producer's output channel j by s_j and multiplies the readers'
input columns by s_j, so the float function is unchanged. A shift z (norm groups only) is
subtracted from the norm output by a norm bias and added back by each reader's bias W @ z.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class BiasedRMSNorm(nn.Module):
    """RMSNorm with a per-channel bias: rms_norm(x) * weight + bias (the runtime's layernorm semantics).

    Replaces an HF RMSNorm when a shift is folded in; keeps the attribute names `weight`,
    `bias` and `variance_epsilon`, so the state dict reads `<norm>.weight` / `<norm>.bias`.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)   # [hidden]
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)       # [hidden]
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(input_dtype) + self.bias

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, bias=True"


@dataclass(slots=True)
class SmoothGroup:
    """A producer and the Linears reading its output; `skip_reason` set when no fold is possible."""

    name: str                           # e.g. "model.layers.0.self_attn.qkv_proj"
    kind: str                           # "norm" | "linear" (the producer's type)
    prev_name: str                      # producer's module name
    parent: nn.Module                   # module holding the producer (to swap a norm for BiasedRMSNorm)
    attr: str                           # producer's attribute name on `parent`
    linear_names: list[str]
    linears: list[nn.Linear]
    channel_map: torch.Tensor | None = None   # [k] long: reader input channel -> producer channel; None = identity
    skip_reason: str | None = None

    @property
    def prev(self) -> nn.Module:
        """The producer module (looked up each time: a shift fold may replace it)."""
        return getattr(self.parent, self.attr)

    @property
    def num_channels(self) -> int:
        """Number of producer output channels a scale has (hidden, or v_proj's out_features)."""
        return self.prev.weight.shape[0]

    def expand(self, per_prev: torch.Tensor) -> torch.Tensor:
        """Producer-channel tensor [c] -> reader-input-channel tensor [k]."""
        return per_prev if self.channel_map is None else per_prev[self.channel_map.to(per_prev.device)]


def _child(module: nn.Module, attr: str, where: str) -> nn.Module:
    if not hasattr(module, attr):
        raise ValueError(f"anti-outlier: {where} has no {attr!r}; only Llama / Qwen2-style decoders (self_attn."
                         "q/k/v/o_proj, mlp.gate/up/down_proj, input/post_attention_layernorm) are supported")
    return getattr(module, attr)


def _o_channel_map(config, v_proj: nn.Linear, o_proj: nn.Linear) -> tuple[torch.Tensor | None, str | None]:
    """o_proj input channel (head h, dim d) -> v_proj output channel (kv head h // groups, dim d)."""
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    if num_heads % num_kv_heads:
        return None, f"num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
    if v_proj.out_features != num_kv_heads * head_dim or o_proj.in_features != num_heads * head_dim:
        return None, (f"v_proj out {v_proj.out_features} / o_proj in {o_proj.in_features} do not match "
                      f"{num_kv_heads} kv heads / {num_heads} heads x head_dim {head_dim}")
    c = torch.arange(o_proj.in_features)
    groups = num_heads // num_kv_heads
    return (c // head_dim // groups) * head_dim + c % head_dim, None


def find_groups(model: nn.Module) -> list[SmoothGroup]:
    """All smoothing groups of a LlamaForCausalLM / Qwen2ForCausalLM-style model, in layer order."""
    layers = _child(_child(model, "model", "the model"), "layers", "model.model")
    groups = []
    for i, layer in enumerate(layers):
        p = f"model.layers.{i}"
        attn, mlp = _child(layer, "self_attn", p), _child(layer, "mlp", p)
        q, k, v, o = (_child(attn, n, f"{p}.self_attn") for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        gate, up, down = (_child(mlp, n, f"{p}.mlp") for n in ("gate_proj", "up_proj", "down_proj"))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            _child(layer, norm, p)
        o_map, o_skip = _o_channel_map(model.config, v, o)
        groups += [
            SmoothGroup(f"{p}.self_attn.qkv_proj", "norm", f"{p}.input_layernorm", layer, "input_layernorm",
                        [f"{p}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")], [q, k, v]),
            SmoothGroup(f"{p}.self_attn.o_proj", "linear", f"{p}.self_attn.v_proj", attn, "v_proj",
                        [f"{p}.self_attn.o_proj"], [o], o_map, o_skip),
            SmoothGroup(f"{p}.mlp.gate_up_proj", "norm", f"{p}.post_attention_layernorm", layer,
                        "post_attention_layernorm", [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"], [gate, up]),
            SmoothGroup(f"{p}.mlp.down_proj", "linear", f"{p}.mlp.up_proj", mlp, "up_proj",
                        [f"{p}.mlp.down_proj"], [down]),
        ]
    return groups


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data.copy_(value.to(param.dtype))


def _add_linear_bias(linear: nn.Linear, delta: torch.Tensor) -> None:
    """bias += delta, creating a zero bias Parameter first if the Linear has none."""
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                               device=linear.weight.device), requires_grad=False)
    _set(linear.bias, linear.bias.float() + delta)


def _fold_norm(group: SmoothGroup, scale: torch.Tensor, shift: torch.Tensor | None) -> None:
    norm = group.prev
    if shift is not None:
        if getattr(norm, "bias", None) is None:
            if not hasattr(norm, "variance_epsilon"):
                raise ValueError(f"{group.prev_name}: cannot add a bias to {type(norm).__name__} "
                                 "(no variance_epsilon: not an RMSNorm)")
            norm = BiasedRMSNorm(norm.weight, torch.zeros_like(norm.weight), norm.variance_epsilon)
            setattr(group.parent, group.attr, norm)
        for linear in group.linears:           # W @ z with the weight before it is rescaled
            _add_linear_bias(linear, linear.weight.float() @ shift)                 # [n]
        _set(norm.bias, (norm.bias.float() - shift) / scale)
    elif getattr(norm, "bias", None) is not None:
        _set(norm.bias, norm.bias.float() / scale)
    _set(norm.weight, norm.weight.float() / scale)


def _fold_linear(group: SmoothGroup, scale: torch.Tensor) -> None:
    prev = group.prev
    _set(prev.weight, prev.weight.float() / scale[:, None])                        # rows [c, k_prev]
    if prev.bias is not None:
        _set(prev.bias, prev.bias.float() / scale)


@torch.no_grad()
def fold_group(group: SmoothGroup, scale: torch.Tensor, shift: torch.Tensor | None = None) -> None:
    """Fold a smoothing scale s [c] (and, for norm groups, a shift z [c]) into the group's weights.

    After the fold each reader sees (y - z) / s in place of the producer output y, and computes
    the same output as before: W' = W * s (columns), b' = b + W @ z.
    """
    if group.skip_reason is not None:
        raise ValueError(f"{group.name}: cannot fold ({group.skip_reason})")
    if shift is not None and group.kind != "norm":
        raise ValueError(f"{group.name}: a shift can only be folded into a norm group")
    device = group.linears[0].weight.device
    scale = scale.float().to(device)
    if shift is not None:
        shift = shift.float().to(device)
    if scale.shape != (group.num_channels,) or not bool((scale > 0).all()) or not bool(scale.isfinite().all()):
        raise ValueError(f"{group.name}: scale must be finite, positive, of shape ({group.num_channels},); "
                         f"got {tuple(scale.shape)}")
    if shift is not None and (shift.shape != scale.shape or not bool(shift.isfinite().all())):
        raise ValueError(f"{group.name}: shift must be finite, of shape ({group.num_channels},); "
                         f"got {tuple(shift.shape)}")
    if group.kind == "norm":
        _fold_norm(group, scale, shift)
    else:
        _fold_linear(group, scale)
    per_column = group.expand(scale)                                               # [k]
    for linear in group.linears:
        _set(linear.weight, linear.weight.float() * per_column[None, :])
