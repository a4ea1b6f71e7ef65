"""Layer-sequential calibration: each decoder layer's Hessians come from the outputs of the layers
before it *as quantized*, as GPTQ implementations run it (the GPTQ paper's layer-by-layer
procedure; llm-compressor's sequential pipeline), so a layer's rounding compensates the error the
earlier layers already made instead of fitting float inputs the quantized model never sees.

The decoder layers are called directly on cached hidden states: the keyword arguments the model
passes to layer 0 (position embeddings, mask, position ids) are captured once per batch and
reused for every layer, so only two layer forwards per layer and batch are run (one to observe,
one after quantization to produce the next layer's inputs) - about two forwards of the model.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from calib.model_spec import LinearGroup

# quantize(groups of one layer, group key -> H [k, k] fp64): rounds those groups and writes the
# dequantized weights back into the model's Linears
QuantizeLayer = Callable[[list[LinearGroup], dict[str, torch.Tensor]], None]
# hook_factory(group, hessians) -> a forward pre-hook accumulating the group's H into hessians
HookFactory = Callable[[LinearGroup, dict[str, torch.Tensor]], Callable[..., None]]


class _Captured(Exception):
    """Raised by the layer-0 hook: the rest of the model need not run."""


@torch.inference_mode()
def capture_layer_inputs(model: nn.Module, batches: list[torch.Tensor]) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """Per batch: (hidden states [b, seq, hidden] entering decoder layer 0, the keyword arguments
    the model passes it)."""
    captured: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden.detach(), kwargs))
        raise _Captured

    device = next(model.parameters()).device
    handle = model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model.model(input_ids=ids.to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


def _hidden(output: Any) -> torch.Tensor:
    """A decoder layer's output hidden states (a tensor, or the first item of a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.inference_mode()
def quantize_sequentially(model: nn.Module, groups: list[LinearGroup], batches: list[torch.Tensor],
                          hook_factory: HookFactory, quantize: QuantizeLayer, progress: bool = True) -> None:
    """For each decoder layer in order: its groups' Hessians from the current (quantized-so-far)
    inputs, `quantize` on them, then the layer re-run with its quantized weights to produce the
    next layer's inputs."""
    by_layer: dict[int, list[LinearGroup]] = defaultdict(list)
    for group in groups:
        by_layer[group.layer_index].append(group)
    modules = dict(model.named_modules())
    inputs = capture_layer_inputs(model, batches)
    for index, layer in enumerate(tqdm(model.model.layers, desc="sequential GPTQ", disable=not progress)):
        hessians: dict[str, torch.Tensor] = {}
        handles = [modules[g.names[0]].register_forward_pre_hook(hook_factory(g, hessians)) for g in by_layer[index]]
        try:
            for hidden, kwargs in inputs:
                layer(hidden, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        quantize(by_layer[index], hessians)
        inputs = [(_hidden(layer(hidden, **kwargs)), kwargs) for hidden, kwargs in inputs]
