"""Pre-quantized weight-only int4 / int8 with group-wise scales (and optional zero points).

The layout is compressed-tensors' `pack-quantized` (what llm-compressor writes for W4A16 / W8A16):
per Linear (each fused shard separately)
- `weight_packed` int32 [n, ceil(k / f)], f = 32 / bits values per int32: value j of a row sits
  in bits [bits * (j % f), bits * (j % f + 1)) of int32 column j // f (least significant first),
  stored unsigned as code + 2^(bits-1); the last column is zero-padded;
- `weight_scale` float [n, ceil(k / g)] (g = group size; channel-wise is one group of k);
- `weight_zero_point` (asymmetric only) int32 [ceil(n / f), ceil(k / g)]: the signed zero points
  packed the same way but along the OUTPUT dim (f rows per int32 row);
- `weight_shape` int [2] = the unpacked (n, k) of that shard, checked against the model.
Dequantization: W[r, c] = (code[r, c] - zp[r, c // g]) * scale[r, c // g]; activations stay float.

After loading, the codes are unpacked once to int8 `weight` [n, k] (the packed int32 is dropped),
zero points to int8 [n, G], and the backend's `weight_only_group_matmul` kernel is selected through
the op registry and prepares its own layout (CPU: this one, dequantize and float matmul; NPU:
npu_weight_quant_batchmatmul with antiquant_group_size; CUDA: a Triton kernel). A backend kernel
that cannot take the layer's traits is passed over for the plain-torch reference on that device,
logged by the registry. Row-parallel layers split k, so each rank's k must be a multiple of both
f and g.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ascend_llm.ops import cpu_quant
from ascend_llm.quant.base import QuantMethod
from ascend_llm.quant.param_loading import add_param, check_loaded

SUPPORTED_BITS = (4, 8)


def pack_factor(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"group-wise weight-only: num_bits {bits} is not supported ({SUPPORTED_BITS})")
    return 32 // bits


def unpack_int32(packed: torch.Tensor, bits: int, size: int, dim: int = 1) -> torch.Tensor:
    """int32 words holding 32 / bits unsigned (code + 2^(bits-1)) values, least significant first,
    along `dim` -> signed int8 codes, `size` of them along `dim` (padding dropped)."""
    f, mask, offset = pack_factor(bits), (1 << bits) - 1, 1 << (bits - 1)
    words = packed.to(torch.int64) & 0xFFFFFFFF                    # the unsigned 32-bit word
    shifts = torch.arange(f, dtype=torch.int64) * bits             # [f]
    if dim == 0:
        values = (words.t()[:, :, None] >> shifts) & mask          # [cols, rows, f]
        values = values.reshape(words.shape[1], -1)[:, :size].t()  # [size, cols]
    else:
        values = (words[:, :, None] >> shifts) & mask              # [rows, cols, f]
        values = values.reshape(words.shape[0], -1)[:, :size]      # [rows, size]
    return (values - offset).to(torch.int8).contiguous()


class GroupWeightOnlyLinearMethod(QuantMethod):
    """int4 / int8 codes with [n, k / g] scales (+ zero points), float activations."""

    def __init__(self, bits: int, group_size: int | None, symmetric: bool,
                 shard_names: tuple[str, ...] = ()) -> None:
        self.f = pack_factor(bits)
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.shard_names = shard_names

    def _tensors(self) -> tuple[str, ...]:
        return ("weight_packed", "weight_scale", "weight_shape") + (() if self.symmetric else ("weight_zero_point",))

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        g = self.group_size or input_size           # None: channel-wise, one group per row
        if getattr(layer, "shards_input_dim", False) and getattr(layer, "tp_size", 1) > 1 \
                and (input_size % g or input_size % self.f):
            raise ValueError(f"{layer.prefix}: input size per rank {input_size} must be a multiple of "
                             f"the group size {g} and of {self.f} (int{self.bits} values per int32)")
        n, shards = sum(output_sizes), len(output_sizes)
        add_param(layer, "weight_packed", (n, math.ceil(input_size / self.f)), torch.int32, out_dim=0, in_dim=1)
        add_param(layer, "weight_scale", (n, math.ceil(input_size / g)), torch.float32, out_dim=0, in_dim=1)
        if not self.symmetric:
            rows = sum(math.ceil(size / self.f) for size in output_sizes)
            add_param(layer, "weight_zero_point", (rows, math.ceil(input_size / g)), torch.int32,
                      out_dim=0, out_block=self.f, in_dim=1)
        shape = add_param(layer, "weight_shape", (shards,), torch.float32, out_dim=None)
        shape.load_check = _shape_check(layer, input_size, output_sizes)
        layer.group_size, layer.act_dtype, layer.in_features_k = g, params_dtype, input_size
        layer.weight_only_group_kernel = None

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        check_loaded(layer, self._tensors(), self.shard_names)
        k, g = layer.in_features_k, layer.group_size
        codes = unpack_int32(layer.weight_packed.data, self.bits, k)                 # [n, k] int8
        scale = layer.weight_scale.data
        if not bool(torch.isfinite(scale).all() and (scale >= 0).all()):
            raise ValueError(f"{layer.prefix}.weight_scale: must be finite and >= 0")
        zero = None
        if not self.symmetric:
            zp, parts, start = layer.weight_zero_point.data, [], 0
            for size in layer.output_sizes:                  # each shard packs its own rows
                rows = math.ceil(size / self.f)
                parts.append(unpack_int32(zp[start:start + rows], self.bits, size, dim=0))
                start += rows
            zero = torch.cat(parts)                                                  # [n, k/g] int8
            layer.weight_zero_point = nn.Parameter(zero, requires_grad=False)
        del layer.weight_packed, layer.weight_shape
        layer.weight = nn.Parameter(codes, requires_grad=False)
        layer.quant_bits = self.bits
        layer.weight_scale = nn.Parameter(scale.to(torch.float32), requires_grad=False)
        if zero is None:
            layer.weight_zero_point = None
        bind_group_kernel(layer)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return run_group_kernel(layer, x, bias)


def run_group_kernel(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The layer's bound `weight_only_group_matmul` kernel, or the CPU reference on a bare layer."""
    kernel = layer.weight_only_group_kernel
    if kernel is None:                       # a bare layer (no op set): the CPU reference
        return cpu_quant.weight_only_group_matmul(layer, x, bias)
    return kernel.run(layer, x, bias)


def bind_group_kernel(layer: nn.Module) -> None:
    """Select the backend's `weight_only_group_matmul` kernel for this layer's traits (bits,
    activation dtype, group size, k, n, zero points) and let it prepare its layout."""
    layer.weight_only_group_kernel = None
    ops = getattr(layer, "ops", None)
    if ops is None:
        return
    n, k = layer.weight.shape
    kernel = ops.bind(layer, "weight_only_group_matmul", bits=layer.quant_bits, dtype=layer.act_dtype,
                        group_size=layer.group_size, k=k, n=n,
                        asymmetric=layer.weight_zero_point is not None)
    kernel.prepare(layer)
    layer.weight_only_group_kernel = kernel


def _shape_check(layer: nn.Module, input_size: int, output_sizes: list[int]):
    """load_check of `weight_shape`: the checkpoint's (n, k) of one shard must be one of this
    layer's full shard shapes; it is stored as a 1 (loaded) in a [shards] parameter."""
    tp = getattr(layer, "tp_size", 1)
    full_k = input_size * tp if getattr(layer, "shards_input_dim", False) else input_size
    full_n = {size * tp if getattr(layer, "shards_output_dim", False) else size for size in output_sizes}
    full_n |= set(output_sizes)            # replicated KV heads keep the full size per rank

    def check(param: nn.Parameter, loaded: torch.Tensor, name: str) -> torch.Tensor:
        values = loaded.flatten().tolist()
        if loaded.is_floating_point() or len(values) != 2 or values[1] != full_k or values[0] not in full_n:
            raise ValueError(f"{name}: weight_shape {values} does not match this layer: expected "
                             f"[n, {full_k}] with n one of {sorted(full_n)}")
        return torch.ones(1)
    return check
