"""compressed-tensors `transform_config`: the online Hadamard rotations this runtime runs.

What compressed-tensors 0.19 defines (compressed_tensors/transform/, read from the installed
package) and how it maps onto this runtime's `online_hadamard` (ascendV1 description key,
`numerics/hadamard.py`, applied by `LinearBase.apply_method` through the `hadamard_transform` op):

- `TransformConfig{config_groups: {name: TransformScheme}}`; a `TransformScheme` has `type`
  ("hadamard", "random-hadamard", "random-matrix"), `apply` (a list of `TransformArgs{targets,
  location, inverse, ignore}`), `randomize`, `requires_grad`, `head_dim` and `precision`.
- type "hadamard" (`factory/hadamard.py`, `utils/hadamard.py` `deterministic_hadamard_matrix`):
  the Sylvester matrix built by H_1 = [1], H_2m = [[H_m, H_m], [H_m, -H_m]], i.e. entry
  (-1)^popcount(i & j), entries +-1; the transform divides by sqrt(size) when applied, so the
  rotation is the orthonormal H_b / sqrt(b), exactly `numerics.hadamard.hadamard_matrix(b)`
  (same ordering, same 1/sqrt(b) scaling; symmetric, so `inverse` (a transpose) changes nothing).
- `head_dim` b: the matrix is b x b and applied block-diagonally over the last dim
  (`utils/matrix.py` `_multihead_matmul` unflattens [..., k] into [..., k / b, b]); null means
  one matrix over the whole input (`get_transform_size`: in_features). b = our `block_size`.
- location "input" (online): a forward pre-hook replaces the Linear's input x [T, k] with
  x @ blockdiag(H_b) / sqrt(b) (`apply_transform_weight`, online branch), which for a symmetric
  H is our `hadamard_transform(x, b)`.
- location "weight_input" (offline): applied ONCE at calibration to the Linear's weight,
  W' = W @ blockdiag(H_b)^T / sqrt(b) (`inverse=True` transposes; symmetric anyway), the
  `module.weight` being overwritten in place (`factory/base.py` `_apply_to_module`). The saved
  checkpoint holds W' (already rotated), like our `rotate_input_blocks`. No loader applies an
  offline location again: vLLM keeps only `args.is_online()` entries
  (vllm/model_executor/layers/quantization/compressed_tensors/transform/linear.py
  `get_linear_transform_schemes`; its transform/module.py `HadamardTransform` runs type
  "hadamard" with the hadacore kernel per head_dim block, normalized), and neither
  compressed-tensors' decompression nor transformers' quantizer reads transform_config.
- llm-compressor's `SpinQuantModifier(rotations=["R4"], transform_block_size=b)` (its R4 = online
  Hadamard before `down_proj`) writes, checked by running it on a tiny Llama:
  `{"R4": {"type": "hadamard", "head_dim": b, "randomize": false, "requires_grad": false,
  "precision": "torch.float64", "apply": [{"targets": ["re:.*down_proj$"], "location": "input",
  "inverse": false, "ignore": []}, {"targets": ["re:.*down_proj$"], "location": "weight_input",
  "inverse": true, "ignore": []}]}}`, and saves the unnormalized +-1 matrix once, as
  `model.layers.0.mlp.down_proj.R4_input.weight` [b, b] (shared by every layer: tied, so saved
  for the first; vLLM's `SharedWeightParameter` shares it; its "hadamard" kernel, hadacore,
  does not read it).

So `online_hadamard: {block_size: b, layers: L}` == one scheme of type "hadamard", head_dim b,
randomize false, applying "input" (and the fused "weight_input", inverse) to exactly L.

Supported here: schemes of type "hadamard" with randomize / requires_grad false; "input" entries
need a power-of-two `head_dim` (the op's block); "weight_input" / "weight_output" entries are
taken as fused (the weights are read as stored, as vLLM does). Refused with a ValueError naming
the scheme: any other type (random-hadamard / random-matrix need their stored matrices online),
randomize (a permuted matrix), online "output", "q_attn", "k_cache" (no such op here), and an
"input" head_dim that is null or not a power of two.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ascend_llm.numerics.hadamard import hadamard_matrix, is_power_of_two
from ascend_llm.quant.config_fields import check_object

SCHEME_KEYS = frozenset({"type", "apply", "randomize", "requires_grad", "head_dim", "precision"})
ARGS_KEYS = frozenset({"targets", "location", "inverse", "ignore"})
FUSED_LOCATIONS = ("weight_input", "weight_output")       # offline: already in the saved weights
ONLINE_UNSUPPORTED = ("output", "q_attn", "k_cache")


def name_matches(entry: str, name: str) -> bool:
    """compressed-tensors target / ignore matching of a module name: `re:<regex>` (re.match) or
    the exact module name, or its last component (e.g. "lm_head")."""
    if entry.startswith("re:"):
        return re.match(entry[3:], name) is not None
    return entry == name or name.endswith(f".{entry}")


@dataclass(frozen=True)
class OnlineHadamard:
    """One scheme's online input Hadamard: block `block_size` before the Linears its targets
    (minus ignore) match; the checkpoint tensor `<layer>.<scheme>_input.weight` may hold the matrix."""

    scheme: str
    block_size: int
    targets: tuple[str, ...]
    ignore: tuple[str, ...] = ()

    def applies_to(self, name: str) -> bool:
        """Whether Linear `name` is targeted (the class target "Linear" takes every one) and not ignored."""
        return (any(t == "Linear" or name_matches(t, name) for t in self.targets)
                and not any(name_matches(i, name) for i in self.ignore))

    @property
    def submodule(self) -> str:
        """The name compressed-tensors gives the transform under its Linear (`<scheme>_input`)."""
        return f"{self.scheme}_input"


def parse_transform_config(raw: Any, where: str) -> list[OnlineHadamard]:
    """The online input Hadamards of a `transform_config` (empty for null / {}); ValueError naming
    the scheme and what is not supported otherwise."""
    if not raw:
        return []
    if not isinstance(raw, dict) or set(raw) != {"config_groups"} or not isinstance(raw["config_groups"], dict):
        raise ValueError(f"{where}: must be {{\"config_groups\": {{name: scheme}}}}, got {raw!r}")
    found = []
    for name, scheme in raw["config_groups"].items():
        found.extend(_parse_scheme(name, scheme, f"{where}.config_groups.{name}"))
    return found


def _parse_scheme(name: str, scheme: Any, where: str) -> list[OnlineHadamard]:
    check_object(scheme, SCHEME_KEYS, where)
    kind = scheme.get("type")
    if kind != "hadamard":
        raise ValueError(f"{where}: transform type {kind!r} is not supported (only 'hadamard', the "
                         f"deterministic Sylvester matrix; a random one needs its stored matrix online)")
    for flag in ("randomize", "requires_grad"):
        if scheme.get(flag, False) is not False:
            raise ValueError(f"{where}.{flag}: {scheme[flag]!r} is not supported (false only: a "
                             f"randomized / trained Hadamard is not the Sylvester matrix)")
    apply = scheme.get("apply", [])
    if not isinstance(apply, list):
        raise ValueError(f"{where}.apply: must be a list, got {type(apply).__name__}")
    online = []
    for index, args in enumerate(apply):
        entry = _parse_args(name, scheme, args, f"{where}.apply[{index}]")
        if entry is not None:
            online.append(entry)
    return online


def _parse_args(name: str, scheme: dict, args: Any, where: str) -> OnlineHadamard | None:
    check_object(args, ARGS_KEYS, where)
    targets, ignore = _names(args.get("targets"), f"{where}.targets"), _names(args.get("ignore", []), f"{where}.ignore")
    if not targets:
        raise ValueError(f"{where}.targets: must name at least one module")
    location = args.get("location")
    if location in FUSED_LOCATIONS:
        return None
    if location in ONLINE_UNSUPPORTED:
        raise ValueError(f"{where}.location: online {location!r} transforms (scheme {name!r}) are not "
                         f"supported; only 'input' (and the fused 'weight_input' / 'weight_output')")
    if location != "input":
        raise ValueError(f"{where}.location: {location!r} is not a compressed-tensors transform location")
    block = scheme.get("head_dim")
    if block is None:
        raise ValueError(f"{where}: scheme {name!r} has head_dim null (one Hadamard over the whole input): "
                         f"not supported; the online op needs a power-of-two head_dim (block size)")
    if not is_power_of_two(block):
        raise ValueError(f"{where}: scheme {name!r} head_dim {block!r} must be a power of two >= 2")
    if "." in name:
        raise ValueError(f"{where}: scheme name {name!r} cannot name a module (it contains '.')")
    return OnlineHadamard(name, block, tuple(targets), tuple(ignore))


def _names(value: Any, where: str) -> list[str]:
    if isinstance(value, str):               # compressed-tensors wraps a single string
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{where}: must be a list of module names / patterns, got {value!r}")
    return value


def transform_for(transforms: list[OnlineHadamard], names: list[str], prefix: str) -> OnlineHadamard | None:
    """The online Hadamard of the layer at `prefix`, whose checkpoint modules (one, or a fused
    layer's shards, which share one input) are `names`; ValueError when they disagree."""
    found = {n: [t for t in transforms if t.applies_to(n)] for n in names}
    for n, hits in found.items():
        if len(hits) > 1:
            raise ValueError(f"{n}: targeted by the online transforms of schemes "
                             f"{[t.scheme for t in hits]}; one input rotation per layer is supported")
    chosen = {n: (hits[0] if hits else None) for n, hits in found.items()}
    if len(set(chosen.values())) > 1:
        labels = {n: (t.scheme if t else None) for n, t in chosen.items()}
        raise ValueError(f"{prefix}: the fused shards have different online input transforms {labels}; "
                         f"they share one input, so all or none of them are rotated, by one scheme")
    return next(iter(chosen.values()))


def add_transform_matrix(layer: nn.Module, transform: OnlineHadamard) -> None:
    """Give `layer` the `<scheme>_input.weight` parameter a checkpoint may hold (llm-compressor saves
    it for the first rotated layer only): optional, empty, and its loader only checks that the
    tensor is the b x b Sylvester Hadamard (+-1, or already divided by sqrt(b)); the op builds its
    own matrix."""
    holder = nn.Module()
    param = nn.Parameter(torch.empty(0), requires_grad=False)
    param.load_optional = True
    param.ignored_reason = ("compressed-tensors transform matrices, checked to be the Sylvester "
                            "Hadamard the hadamard_transform op applies")
    param.weight_loader = lambda _p, loaded, _shard=None: check_hadamard_matrix(
        loaded, transform.block_size, f"{getattr(layer, 'prefix', '')}.{transform.submodule}.weight")
    holder.register_parameter("weight", param)
    layer.register_module(transform.submodule, holder)


def check_hadamard_matrix(loaded: torch.Tensor, block: int, name: str) -> None:
    """ValueError naming `name` unless `loaded` is H_b (+-1) or H_b / sqrt(b), Sylvester order."""
    if tuple(loaded.shape) != (block, block) or not loaded.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point [{block}, {block}] Hadamard matrix "
                         f"(head_dim {block}), got {loaded.dtype} {tuple(loaded.shape)}")
    want = hadamard_matrix(block, torch.float64) * block ** 0.5                 # +-1
    got = loaded.to(torch.float64)
    if not (torch.allclose(got, want, atol=1e-3) or torch.allclose(got * block ** 0.5, want, atol=1e-3)):
        raise ValueError(f"{name}: not the Sylvester Hadamard matrix of size {block} (a permuted or "
                         f"random one?); only the deterministic 'hadamard' transform is supported")
