"""After a model is built: every layer a checkpoint's `online_hadamard` key lists rotates its input.

The description check (quant/formats.py) only sees names; a listed name can still be a layer the
built model does not have (a checkpoint of a deeper model, a module this architecture leaves out)
or a module that is not a Linear (a norm, an attention block, a router the model builds as a plain
nn.Linear). Such a weight holds a folded rotation that nothing would undo, so the model would load
and compute something else: refused here, naming each such layer and what it is. A block that does
not divide a layer's (per-rank) input is refused earlier, when that Linear is built
(`LinearBase._bind_input_transform`).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ascend_llm.layers.linear import LinearBase
from ascend_llm.quant.formats import ONLINE_HADAMARD_KEY


def check_online_hadamard_layers(model: nn.Module, quant_config: Any) -> None:
    """ValueError naming every `online_hadamard` layer of `quant_config` that `model` does not
    build as a rotating Linear (missing, or not a Linear); no-op without the key."""
    listed = quant_config.online_hadamard_layers() if quant_config is not None else []
    if not listed:
        return
    modules = dict(model.named_modules())
    rotated = {name for module in modules.values() if isinstance(module, LinearBase)
               and module.input_hadamard_block for name in quant_config.hadamard_rotated_names(module.prefix)}
    problems = [f"{name!r} ({_what(modules.get(name))})" for name in listed if name not in rotated]
    if problems:
        source = getattr(quant_config, "source", "the quant description")
        raise ValueError(f"{source}: '{ONLINE_HADAMARD_KEY}'.layers names {len(problems)} layer(s) that the built "
                         f"{type(model).__name__} cannot rotate: {', '.join(problems)}; only its Linear layers "
                         f"take an online rotation")


def _what(module: nn.Module | None) -> str:
    if module is None:
        return "no such layer in the built model"
    if isinstance(module, nn.Linear):
        return "a plain torch.nn.Linear, which applies no rotation"
    return f"a {type(module).__name__}, not a Linear layer"
