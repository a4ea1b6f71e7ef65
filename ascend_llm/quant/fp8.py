"""Online FP8 (e4m3) quantization from a float checkpoint.

- `fp8` (vLLM online): one float32 scale per layer, s_w = amax(|W|) / 448, weight e4m3 [n, k];
  activations quantized dynamically per tensor at every call, or, given a static input scale
  per layer (`Fp8Config(input_scales={prefix: scale})`, the AutoFP8 `activation_scheme: static`
  path), with that fixed scale: x_q = sat_e4m3(x / input_scale).
- `block_wise_fp8` (FastDeploy / DeepSeek): 128x128 weight blocks, `weight_scale_inv` float32
  [ceil(n/128), ceil(k/128)] (a dequant multiplier despite the name); activations quantized
  dynamically per token per 128 channels. Partial edge blocks (576 = 4.5 x 128) are handled.

Both load the float weight through the layer's weight_loader, then quantize in
`process_weights_after_loading` and free the float copy. Op: `fp8_matmul` with trait `scheme`
("per_tensor", "per_tensor_static", "block"). Pre-quantized fp8 checkpoints: quant/fp8_checkpoint.py.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn

from ascend_llm.distributed.communication import group_max, is_tensor_parallel
from ascend_llm.numerics import primitives as P
from ascend_llm.ops import cpu_quant
from ascend_llm.quant.base import QuantConfig, QuantMethod
from ascend_llm.quant.moe_fp8 import BlockFp8MoEMethod


def _create_float_weight(layer: nn.Module, input_size: int, output_sizes: list[int],
                         params_dtype: torch.dtype) -> None:
    weight = nn.Parameter(torch.empty(sum(output_sizes), input_size, dtype=params_dtype),
                          requires_grad=False)                      # [n, k] float until quantized
    layer.register_parameter("weight", weight)
    layer.fp8_kernel = None


def _check_float(layer: nn.Module) -> None:
    if layer.weight.dtype == P.FP8_DTYPE:
        raise ValueError(f"{getattr(layer, 'prefix', 'layer')}.weight: already fp8; "
                         "process_weights_after_loading ran twice")


_REFERENCES = {"per_tensor": cpu_quant.fp8_matmul_per_tensor,
               "per_tensor_static": cpu_quant.fp8_matmul_per_tensor_static,
               "block": cpu_quant.fp8_matmul_block}


def bind_fp8_kernel(layer: nn.Module, scheme: str, act_dtype: torch.dtype) -> None:
    """Record the layer's scheme and bind the backend's `fp8_matmul` kernel for it."""
    if scheme not in _REFERENCES:
        raise ValueError(f"fp8 scheme {scheme!r} is not one of {sorted(_REFERENCES)}")
    layer.fp8_scheme = scheme
    ops = getattr(layer, "ops", None)
    if ops is None:
        return
    kernel = ops.bind(layer, "fp8_matmul", scheme=scheme, dtype=act_dtype)
    kernel.prepare(layer)
    layer.fp8_kernel = kernel


def run_fp8(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The bound kernel, or the scheme's CPU reference for a bare layer (no backend)."""
    if layer.fp8_kernel is None:
        return _REFERENCES[layer.fp8_scheme](layer, x, bias)
    return layer.fp8_kernel.run(layer, x, bias)


def quantize_fp8_per_tensor_tp(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor e4m3 of the layer's float weight; under tensor parallelism the scale is the
    max over the group (amax -> scale is monotonic), so every rank matches TP=1 bit for bit."""
    q, scale = P.quantize_fp8_per_tensor(layer.weight.data)                 # [n, k], 0-dim
    if not is_tensor_parallel(layer):
        return q, scale
    scale = group_max(layer, scale)
    return P.fp8_cast(layer.weight.data.float() / scale), scale


def check_block_shards(layer: nn.Module, output_sizes: list[int], input_size: int,
                       block_size: tuple[int, int]) -> None:
    """ValueError naming the layer when a tensor-parallel shard does not hold whole fp8 blocks."""
    if getattr(layer, "tp_size", 1) == 1:
        return
    bn, bk = block_size
    prefix = getattr(layer, "prefix", "layer")
    if getattr(layer, "shards_input_dim", False):
        if input_size % bk:
            raise ValueError(f"{prefix}: block-wise fp8 with tensor_parallel_size {layer.tp_size} needs "
                             f"the per-rank input size ({input_size}) divisible by {bk}")
    elif any(size % bn for size in output_sizes):
        raise ValueError(f"{prefix}: block-wise fp8 with tensor_parallel_size {layer.tp_size} needs "
                         f"every per-rank output size ({list(output_sizes)}) divisible by {bn}")


class Fp8LinearMethod(QuantMethod):
    """Per-tensor e4m3 weight (`weight_scale` 0-dim float32); e4m3 activations, dynamic per tensor
    or with a fixed `input_scale` (0-dim float32) when one is given."""

    def __init__(self, input_scale: float | None = None) -> None:
        if input_scale is not None and not (input_scale > 0 and input_scale < float("inf")):
            raise ValueError(f"input_scale: must be finite and > 0, got {input_scale}")
        self.input_scale = input_scale

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        _create_float_weight(layer, input_size, output_sizes, params_dtype)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        _check_float(layer)
        act_dtype = layer.weight.dtype                               # the model dtype
        q, scale = quantize_fp8_per_tensor_tp(layer)                 # [n, k] e4m3, 0-dim
        layer.weight = nn.Parameter(q, requires_grad=False)
        layer.weight_scale = nn.Parameter(scale, requires_grad=False)
        if self.input_scale is None:
            bind_fp8_kernel(layer, "per_tensor", act_dtype)
            return
        layer.input_scale = nn.Parameter(torch.tensor(self.input_scale, dtype=torch.float32),
                                         requires_grad=False)
        bind_fp8_kernel(layer, "per_tensor_static", act_dtype)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return run_fp8(layer, x, bias)


class BlockFp8LinearMethod(QuantMethod):
    """e4m3 weight in (bn, bk) blocks with `weight_scale_inv` [NB, KB]; activations per token per bk."""

    def __init__(self, block_size: tuple[int, int] = (128, 128)) -> None:
        if len(block_size) != 2 or min(block_size) < 1:
            raise ValueError(f"weight_block_size: expected two positive ints, got {block_size}")
        self.block_size = (int(block_size[0]), int(block_size[1]))

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        check_block_shards(layer, output_sizes, input_size, self.block_size)
        _create_float_weight(layer, input_size, output_sizes, params_dtype)
        layer.weight_block_size = self.block_size

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        _check_float(layer)
        act_dtype = layer.weight.dtype                               # the model dtype
        q, scale_inv = P.quantize_fp8_block(layer.weight.data, self.block_size)   # [n, k], [NB, KB]
        layer.weight = nn.Parameter(q, requires_grad=False)
        layer.weight_scale_inv = nn.Parameter(scale_inv, requires_grad=False)
        bind_fp8_kernel(layer, "block", act_dtype)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return run_fp8(layer, x, bias)


class Fp8Config(QuantConfig):
    """`fp8`: vLLM's online FP8 (per-tensor weights; activations dynamic per tensor, or static
    with `input_scales` {layer prefix: scale} for the layers listed there)."""

    def __init__(self, input_scales: Mapping[str, float] | None = None) -> None:
        self.input_scales = dict(input_scales or {})

    @classmethod
    def get_name(cls) -> str:
        return "fp8"

    def get_quant_method(self, layer: nn.Module, prefix: str) -> QuantMethod | None:
        if getattr(layer, "is_fused_moe", False):      # MoE experts: quant/moe_*.py
            raise ValueError(f"{prefix}: per-tensor fp8 MoE experts are not supported; use "
                             f"--quantization block_wise_fp8")
        return Fp8LinearMethod(self.input_scales.get(prefix))


class BlockWiseFp8Config(QuantConfig):
    """`block_wise_fp8`: FastDeploy's online 128x128 block FP8 (W8A8-FP8)."""

    def __init__(self, block_size: tuple[int, int] = (128, 128)) -> None:
        self.block_size = block_size

    @classmethod
    def get_name(cls) -> str:
        return "block_wise_fp8"

    def get_quant_method(self, layer: nn.Module, prefix: str) -> QuantMethod | None:
        if getattr(layer, "is_fused_moe", False):      # MoE experts: quant/moe_*.py
            return BlockFp8MoEMethod(self.block_size, online=True)
        return BlockFp8LinearMethod(self.block_size)
