"""Map checkpoint tensor names onto (possibly fused) model parameters."""
from __future__ import annotations

import logging
from typing import Callable, Iterable

import torch
import torch.nn as nn

from ascend_llm.layers.kv_scales import load_kv_scale
from ascend_llm.quant.formats import norm_module_alias

logger = logging.getLogger(__name__)

# checkpoint tensors that carry no weights we use
_SKIPPED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def load_weights_into(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                      packed_modules_mapping: dict[str, tuple[str, str | int]],
                      expert_loader: Callable[[str, torch.Tensor], list[str] | None] | None = None
                      ) -> set[str]:
    """Load `weights` into `model`; fused layers get each shard through their weight_loader.

    `expert_loader(name, tensor)` (MoE models, `layers.moe.expert_loader`) loads per-expert
    tensors into stacked expert parameters and returns their names, None for other tensors.
    Raises ValueError for unknown tensor names, shape mismatches and missing parameters.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    extras = _NormExtras(params)
    ignored: dict[str, list[str]] = {}     # reason -> checkpoint names loaded but unused
    for name, tensor in weights:
        if name.endswith(_SKIPPED_SUFFIXES):
            continue
        if extras.take(name, tensor):              # msModelSlim norm aliases / zero norm biases
            continue
        if load_kv_scale(model, name, tensor):     # KV-cache scales go to their attention layer
            continue
        expert_targets = expert_loader(name, tensor) if expert_loader is not None else None
        if expert_targets is not None:
            loaded.update(expert_targets)
            continue
        target, shard_id = _resolve_name(name, packed_modules_mapping)
        param = params.get(target)
        if param is None:
            if _is_tied_head(model, target):
                continue
            raise ValueError(f"checkpoint tensor {name!r} matches no model parameter")
        reason = getattr(param, "ignored_reason", None)
        if reason is not None:
            ignored.setdefault(reason, []).append(name)
        loader = getattr(param, "weight_loader", None)
        if loader is not None:
            loader(param, tensor, shard_id)
        else:
            _default_loader(param, tensor, name)
        loaded.add(target)
    _check_all_loaded(model, params, loaded)
    extras.check()
    for reason, names in ignored.items():     # optional extras the quant method does not use
        logger.info("ignoring %d checkpoint tensors: %s (%s)", len(names), _shown(sorted(names)), reason)
    return loaded


class _NormExtras:
    """msModelSlim's anti-outlier norm extras, accepted only in these documented shapes:

    - `X.module.weight` / `X.module.bias` (X a `*norm`): copies of `X.weight` / `X.bias` that its
      older savers (classic `safe_tensor`) keep; checked equal to them after loading, then dropped;
    - `X.bias` of a norm the model builds without a bias (the description does not list it; a
      listed norm bias, the final `model.norm`'s included, gets a parameter): accepted when all
      zero (adding it is a no-op), else a ValueError naming it.
    Every other unknown tensor still fails in `load_weights_into`. One INFO line lists them.
    """

    def __init__(self, params: dict[str, nn.Parameter]) -> None:
        self.params = params
        self.aliases: dict[str, tuple[str, torch.Tensor]] = {}     # alias -> (original, tensor)
        self.zero_biases: dict[str, torch.Tensor] = {}             # norm bias without a param

    def take(self, name: str, tensor: torch.Tensor) -> bool:
        if name in self.params:
            return False
        original = norm_module_alias(name)
        if original is not None:
            self.aliases[name] = (original, tensor)
            return True
        norm, _, leaf = name.rpartition(".")
        if leaf == "bias" and norm.endswith("norm") and f"{norm}.weight" in self.params:
            if bool((tensor != 0).any()):
                raise ValueError(f"checkpoint tensor {name!r}: a non-zero norm bias (msModelSlim "
                                 f"anti-outlier) for a norm this model builds without a bias")
            self.zero_biases[name] = tensor
            return True
        return False

    def check(self) -> None:
        for alias, (original, tensor) in self.aliases.items():
            param = self.params.get(original)
            want = param.data if param is not None else self.zero_biases.get(original)
            if want is None:
                raise ValueError(f"checkpoint tensor {alias!r} matches no model parameter "
                                 f"(an alias of {original!r}, which the checkpoint lacks)")
            # compared in the model's dtype: a float16 / bfloat16 model holds the rounded copy
            if want.shape != tensor.shape or not torch.equal(want, tensor.to(want.dtype)):
                raise ValueError(f"checkpoint tensor {alias!r} differs from {original!r}; msModelSlim "
                                 f"writes it as an identical copy")
        if self.aliases:
            logger.info("ignoring %d checkpoint tensors: %s (msModelSlim norm aliases, checked equal "
                        "to the norm's own weight / bias)", len(self.aliases), _shown(sorted(self.aliases)))
        if self.zero_biases:
            logger.info("ignoring %d checkpoint tensors: %s (all-zero msModelSlim anti-outlier biases of "
                        "norms built without one)", len(self.zero_biases), _shown(sorted(self.zero_biases)))


def _shown(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f" ... ({len(names) - limit} more)" if len(names) > limit else "")


def _resolve_name(name: str, mapping: dict[str, tuple[str, str | int]]) -> tuple[str, str | int | None]:
    for ckpt_part, (fused_part, shard_id) in mapping.items():
        if f".{ckpt_part}." in name:
            return name.replace(f".{ckpt_part}.", f".{fused_part}."), shard_id
    return name, None


def _is_tied_head(model: nn.Module, target: str) -> bool:
    return target == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False)


def _default_loader(param: nn.Parameter, tensor: torch.Tensor, name: str) -> None:
    if param.shape != tensor.shape:
        raise ValueError(f"{name}: checkpoint tensor has shape {tuple(tensor.shape)}, "
                         f"expected {tuple(param.shape)}")
    param.data.copy_(tensor)


def _check_all_loaded(model: nn.Module, params: dict[str, nn.Parameter], loaded: set[str]) -> None:
    tied = {n for n, p in params.items() if n == "lm_head.weight"
            and p is params.get("model.embed_tokens.weight")}
    optional = {n for n, p in params.items() if getattr(p, "load_optional", False)}
    missing = sorted(set(params) - loaded - tied - optional)
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise ValueError(f"checkpoint is missing {len(missing)} tensors: {shown}")


def process_weights_after_loading(model: nn.Module) -> None:
    """Let every layer's quant method quantize / re-layout its weights and bind its kernel."""
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(module)


def fused_shards(packed_modules_mapping: dict[str, tuple[str, str | int]]) -> dict[str, tuple[str, ...]]:
    """{fused name: checkpoint shard names in shard order}, e.g. qkv_proj -> (q_proj, k_proj, v_proj)."""
    shards: dict[str, list[str]] = {}
    for ckpt_name, (fused_name, _) in packed_modules_mapping.items():
        shards.setdefault(fused_name, []).append(ckpt_name)
    return {name: tuple(parts) for name, parts in shards.items()}
