"""msModelSlim weight-only layers with int4 codes or group-wise scales: W4A16 (per-channel or
per-group) and W8A16 per-group (the description's top-level `group_size` > 0).

Layout, as msModelSlim's classic saver writes it (msmodelslim/pytorch/llm_ptq/llm_ptq_tools/save/
complex_quantifier.py: `_w4a16_pack_int4` over format/common/pack.py `_pack_int4`), per Linear
(each fused shard separately):
- W8A16: `weight` int8 [n, k];
- W4A16 per-group: `weight` int8 [ceil(n / 2), k]: two int4 codes per byte along the OUTPUT dim,
  row 2j in the low nibble and row 2j + 1 in the high one (two's complement);
- W4A16 per-channel: `weight` int8 [n, ceil(k / 2)]: two codes per byte along k, column 2j low;
- `weight_scale`, `weight_offset` float32 [n, k / g] (g = group_size; per-channel: [n, 1]).
Dequantization: W[r, c] = (code[r, c] - offset[r, c // g]) * scale[r, c // g]; activations float.

After loading, the codes are unpacked once to int8 `weight` [n, k], integral offsets become int8
zero points [n, k / g] (None when all are zero) and the backend's `weight_only_group_matmul`
kernel is bound through the op registry, exactly as for compressed-tensors' pack-quantized layers
(quant/weight_only_group.py), so every backend runs these layers with the same kernels.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ascend_llm.numerics.primitives import unpack_int4
from ascend_llm.quant.base import QuantMethod
from ascend_llm.quant.param_loading import add_param, check_loaded
from ascend_llm.quant.weight_only_group import bind_group_kernel, run_group_kernel

TENSORS = ("weight", "weight_scale", "weight_offset")


class ModelSlimWeightOnlyMethod(QuantMethod):
    """msModelSlim W4A16 (per-channel / per-group) and W8A16 per-group linear layers."""

    checkpoint_bias: bool = False
    shard_names: tuple[str, ...] = ()

    def __init__(self, bits: int, group_size: int, prefix: str = "") -> None:
        if bits not in (4, 8):
            raise ValueError(f"{prefix}: msModelSlim weight-only needs 4 or 8 bits, got {bits}")
        if bits == 8 and not group_size:
            raise ValueError(f"{prefix}: per-channel W8A16 is W8A16LinearMethod's")
        self.bits, self.group_size, self.prefix = bits, group_size, prefix

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        k, n = input_size, sum(output_sizes)
        g = self.group_size or k
        if k % g:
            raise ValueError(f"{layer.prefix}: input size {k} (per rank) is not a multiple of the "
                             f"description's group_size {g}")
        groups = k // g
        if self.bits == 8:
            add_param(layer, "weight", (n, k), torch.int8, out_dim=0, in_dim=1)                 # [n, k]
        elif self.group_size:
            rows = sum(math.ceil(size / 2) for size in output_sizes)
            add_param(layer, "weight", (rows, k), torch.int8, out_dim=0, out_block=2, in_dim=1)  # [n/2, k]
        else:
            if getattr(layer, "shards_input_dim", False) and k % 2:
                raise ValueError(f"{layer.prefix}: input size per rank {k} must be even (int4 pairs)")
            add_param(layer, "weight", (n, math.ceil(k / 2)), torch.int8, out_dim=0, in_dim=1)   # [n, k/2]
        scale_in_dim = 1 if self.group_size else None
        for name in ("weight_scale", "weight_offset"):
            add_param(layer, name, (n, groups), torch.float32, out_dim=0, in_dim=scale_in_dim)   # [n, G]
        layer.group_size, layer.act_dtype, layer.in_features_k = g, params_dtype, k
        layer.weight_only_group_kernel = None

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        check_loaded(layer, TENSORS, self.shard_names)
        scale = layer.weight_scale.data
        if not bool(torch.isfinite(scale).all() and (scale >= 0).all()):
            raise ValueError(f"{layer.prefix}.weight_scale: must be finite and >= 0")
        codes = self._codes(layer)                                                   # [n, k] int8
        zero = _zero_points(layer.weight_offset.data, self.bits, layer.prefix)       # [n, G] | None
        del layer.weight, layer.weight_offset
        layer.weight = nn.Parameter(codes, requires_grad=False)
        layer.weight_scale = nn.Parameter(scale.to(torch.float32), requires_grad=False)
        layer.weight_zero_point = None if zero is None else nn.Parameter(zero, requires_grad=False)
        layer.quant_bits = self.bits
        bind_group_kernel(layer)

    def _codes(self, layer: nn.Module) -> torch.Tensor:
        """The checkpoint's `weight` as int8 codes [n, k]."""
        stored, k = layer.weight.data, layer.in_features_k
        if self.bits == 8:
            return stored.contiguous()
        if not self.group_size:
            return unpack_modelslim_int4(stored, sum(layer.output_sizes), k, False)
        parts, start = [], 0
        for size in layer.output_sizes:                          # each shard pairs its own rows
            rows = math.ceil(size / 2)
            parts.append(unpack_modelslim_int4(stored[start:start + rows], size, k, True))
            start += rows
        return torch.cat(parts).contiguous()

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return run_group_kernel(layer, x, bias)


def unpack_modelslim_int4(stored: torch.Tensor, n: int, k: int, group_wise: bool) -> torch.Tensor:
    """One Linear's msModelSlim W4A16 `weight` -> int8 codes [n, k]: per-group it is
    [ceil(n / 2), k] (pairs along n), per-channel [n, ceil(k / 2)] (pairs along k)."""
    expected = (math.ceil(n / 2), k) if group_wise else (n, math.ceil(k / 2))
    if tuple(stored.shape) != expected or stored.dtype not in (torch.int8, torch.uint8):
        raise ValueError(f"W4A16 weight: expected int8 {list(expected)} for [n, k] = [{n}, {k}] "
                         f"({'per-group' if group_wise else 'per-channel'}), got {stored.dtype} "
                         f"{list(stored.shape)}")
    if group_wise:
        return unpack_int4(stored.t().contiguous().view(torch.uint8), n).t().contiguous()
    return unpack_int4(stored.contiguous().view(torch.uint8), k)


def _zero_points(offset: torch.Tensor, bits: int, prefix: str) -> torch.Tensor | None:
    """msModelSlim's float `weight_offset` [n, G] -> int8 zero points, None when all are zero.
    The offsets must be whole numbers within the int8 range (msModelSlim rounds them)."""
    if not bool(torch.isfinite(offset).all()):
        raise ValueError(f"{prefix}.weight_offset: must be finite")
    if not bool((offset == offset.round()).all()):
        raise ValueError(f"{prefix}.weight_offset: W{bits}A16 offsets must be whole numbers "
                         f"(zero points on the int{bits} grid)")
    if bool((offset < -128).any() or (offset > 127).any()):
        raise ValueError(f"{prefix}.weight_offset: zero points must lie in [-128, 127]")
    if not bool((offset != 0).any()):
        return None
    return offset.to(torch.int8).contiguous()
