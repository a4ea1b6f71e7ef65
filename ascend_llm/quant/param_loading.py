"""Checkpoint parameters of pre-quantized linear layers: declaration, dtype checks, completeness.

A quantized checkpoint gives every fused shard (q/k/v, gate/up) its own tensors, and not all of
them have the weight's [n, k] shape: scales are [n], per-tensor scalars, [n / 128, k / 128]
blocks, or FastDeploy's transposed [k / 4, n] WINT2 bytes. Each parameter declared here records
where its output dim is (`out_dim`, None for one scalar per shard), how many output rows one of
its rows covers (`out_block`), and which dim a row-parallel layer splits (`in_dim`). The
layer's loader (`layers.linear`) places a shard accordingly and records (name, shard index),
so a missing scale of one shard is reported by name after loading instead of computing with zeros.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn


def add_param(layer: nn.Module, name: str, shape: tuple[int, ...], dtype: torch.dtype,
              out_dim: int | None, out_block: int = 1, in_dim: int | None = None) -> nn.Parameter:
    """Register a zero-filled frozen parameter `name` on `layer`, described for the layer's
    loader (`layers.linear.LinearBase.weight_loader` places it; `as_param_dtype` checks it)."""
    param = nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False)
    param.quant_name, param.out_dim, param.out_block, param.in_dim = name, out_dim, out_block, in_dim
    param.load_check = as_param_dtype
    layer.register_parameter(name, param)
    return param


_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def as_param_dtype(param: nn.Parameter, loaded: torch.Tensor, name: str) -> torch.Tensor:
    """Integer and fp8 parameters take their exact dtype (fp8 codes are never produced by a cast);
    a uint8 byte container (packed int4, WINT2) also takes int8 bytes, viewed. Other floats are
    cast by the copy."""
    if param.dtype in _FP8_DTYPES or loaded.dtype in _FP8_DTYPES:
        if loaded.dtype != param.dtype:
            raise ValueError(f"{name}: checkpoint tensor has dtype {loaded.dtype}, expected {param.dtype}")
        return loaded
    if param.dtype.is_floating_point:
        if not loaded.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point tensor, got {loaded.dtype}")
        return loaded
    if loaded.dtype == param.dtype:
        return loaded
    if param.dtype == torch.uint8 and loaded.dtype == torch.int8:
        return loaded.view(torch.uint8)
    raise ValueError(f"{name}: checkpoint tensor has dtype {loaded.dtype}, expected {param.dtype}")


def check_loaded(layer: nn.Module, names: Sequence[str], shard_names: Sequence[str] = ()) -> None:
    """ValueError naming the checkpoint tensor of the first (param, shard) that was never loaded.

    `shard_names` are the checkpoint module names of a fused layer's shards in order
    (q_proj, k_proj, v_proj), used to name the missing tensor as the checkpoint spells it.
    """
    loaded = getattr(layer, "loaded_shards", set())
    num_shards = len(layer.output_sizes)
    for name in names:
        for index in range(num_shards):
            if (name, index) not in loaded:
                missing = _checkpoint_name(layer, name, index, shard_names)
                raise ValueError(f"checkpoint is missing tensor {missing!r} (needed by {layer.prefix})")


def _checkpoint_name(layer: nn.Module, name: str, index: int, shard_names: Sequence[str]) -> str:
    if len(layer.output_sizes) == 1 or index >= len(shard_names):
        return f"{layer.prefix}.{name}"
    parent = layer.prefix.rpartition(".")[0]
    return f"{parent}.{shard_names[index]}.{name}" if parent else f"{shard_names[index]}.{name}"


def shard_names_for(prefix: str, packed_modules: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    """Checkpoint shard module names of the layer at `prefix` (() when it is not fused)."""
    return tuple(packed_modules.get(prefix.rpartition(".")[2], ()))
