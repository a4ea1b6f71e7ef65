"""Checkpoint parameters of pre-quantized linear layers: declaration, shard placement, completeness.

A quantized checkpoint gives every fused shard (q/k/v, gate/up) its own tensors, and not all of
them have the weight's [n, k] shape: scales are [n], per-tensor scalars, [n / 128, k / 128]
blocks, or FastDeploy's transposed [k / 4, n] WINT2 bytes. Each parameter declared here records
where its output dim is (`out_dim`, None for one scalar per shard), how many output rows one of
its rows covers (`out_block`), and which dim a row-parallel layer splits (`in_dim`). Its own
`weight_loader` places a shard accordingly and records (name, shard index), so a missing scale
of one shard is reported by name after loading instead of computing with zeros.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from ascend_llm.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear


def add_param(layer: nn.Module, name: str, shape: tuple[int, ...], dtype: torch.dtype,
              out_dim: int | None, out_block: int = 1, in_dim: int | None = None) -> nn.Parameter:
    """Register a zero-filled frozen parameter `name` on `layer` with its own shard-aware loader."""
    param = nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False)
    param.quant_name, param.out_dim, param.out_block, param.in_dim = name, out_dim, out_block, in_dim
    param.weight_loader = functools.partial(load_shard, layer)
    layer.register_parameter(name, param)
    if not hasattr(layer, "loaded_shards"):
        layer.loaded_shards = set()
    return param


def shard_index(layer: nn.Module, shard_id: str | int | None) -> int:
    """The fused-shard index of `shard_id` (0 for unfused layers)."""
    if isinstance(layer, ColumnParallelLinear):
        return layer.shard_index(shard_id)
    if shard_id is not None:
        raise ValueError(f"{layer.prefix}: unexpected shard id {shard_id!r} for an unfused layer")
    return 0


def load_shard(layer: nn.Module, param: nn.Parameter, loaded: torch.Tensor,
               shard_id: str | int | None = None) -> None:
    """Copy one checkpoint tensor (one fused shard, this TP rank's part) into `param`."""
    index = shard_index(layer, shard_id)
    name = f"{layer.prefix}.{param.quant_name}" + ("" if shard_id is None else f"[{shard_id}]")
    if param.out_dim is None:
        if loaded.numel() != 1:
            raise ValueError(f"{name}: expected a per-tensor scalar, got shape {tuple(loaded.shape)}")
        param.data[index] = loaded.reshape(()).to(param.dtype)
    else:
        loaded = as_param_dtype(param, loaded, name)
        dst, part = _destination(layer, param, loaded, index)
        if tuple(dst.shape) != tuple(part.shape):
            raise ValueError(f"{name}: checkpoint tensor has shape {tuple(part.shape)}, "
                             f"expected {tuple(dst.shape)}")
        dst.copy_(part)
    layer.loaded_shards.add((param.quant_name, index))


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


def _destination(layer: nn.Module, param: nn.Parameter, loaded: torch.Tensor,
                 index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(slice of param.data, slice of loaded) for shard `index` on this rank."""
    dst = param.data
    if isinstance(layer, ColumnParallelLinear):
        offset, size = layer.shard_offset(index)
        rank = layer.tp_rank
        if isinstance(layer, QKVParallelLinear) and index > 0:
            rank = layer.tp_rank // layer.kv_replicas
        block = param.out_block
        rows = math.ceil(size / block)
        if layer.tp_size > 1 and loaded.dim() > param.out_dim:
            loaded = loaded.narrow(param.out_dim, rank * rows, rows)
        # each fused shard has its own block grid (a partial last block included)
        block_offset = sum(math.ceil(s / block) for s in layer.output_sizes[:index])
        return dst.narrow(param.out_dim, block_offset, rows), loaded
    if isinstance(layer, RowParallelLinear) and layer.tp_size > 1 and param.in_dim is not None:
        size = dst.shape[param.in_dim]
        loaded = loaded.narrow(param.in_dim, layer.tp_rank * size, size)
    return dst, loaded


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
