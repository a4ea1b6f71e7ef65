"""NPU grouped matmuls of MoE experts (torch_npu.npu_grouped_matmul): float and quantized.

Float op `grouped_matmul`: x [M, k] with rows sorted by expert, weight [E, k, n] (the NPU layout:
`prepare_expert_weights` transposes the checkpoint's [E, n, k]), group_list [E] int64 cumulative
row ends per expert (group_list_type 0).

Quantized op `fused_experts` (the whole SwiGLU expert block, run(layer, x, group_list) -> [M, H]):
- W8A8_DYNAMIC (`prepare_w8a8_dynamic` / `run_w8a8_dynamic`): npu_dynamic_quant of the sorted
  tokens (int8 + float32 per-token scale), npu_grouped_matmul int8 x int8 with the per-channel
  weight `scale` [E, n] and `per_token_scale` [M], output in the activation dtype; SwiGLU
  (`silu_and_mul`, npu_swiglu); the same again for down. The scale dtype follows the documented
  pertoken table: bfloat16 for bfloat16 outputs, float32 for float16 outputs. The int8 weights
  are [E, k, n] cast to FRACTAL_NZ as vllm-ascend does. (vllm-ascend's int32-output gate_up +
  npu_dequant_swiglu_quant variant computes the same values; this path uses only the
  documented pertoken scenario of npu_grouped_matmul.)
- weight-only int8 / int4 (`prepare_weight_only` / `run_weight_only`): npu_grouped_matmul's
  pseudo-quant scenario y = x @ (weight * antiquant_scale), antiquant_scale [E, n] in the
  activation dtype, no antiquant_offset (the codes are symmetric). int8 weights are [E, k, n]
  int8 (ND). int4 weights: PyTorch has no int4 dtype, so (as the torch_npu documentation says)
  they are carried in int32, eight int4 codes per int32 along n: each expert's [k, n] codes go
  through npu_convert_weight_to_int4pack (int32 [k, n] -> int32 [k, n / 8]) and the experts are
  stacked to int32 [E, k, n / 8]; this needs n % 8 == 0, which `supports` checks.
310P (Atlas inference series): npu_grouped_matmul takes no scale / antiquant_scale there, so the
quantized kernels report it as unsupported and the layer keeps its reference path.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ascend_llm.numerics import primitives as P
from ascend_llm.ops.npu_runtime import is_310p, to_nz, torch_npu

NPU_ACT_DTYPES = (torch.float16, torch.bfloat16)
_PROJS = ("w13", "w2")


def prepare_expert_weights(weight: torch.Tensor) -> torch.Tensor:
    """[E, n, k] checkpoint layout -> [E, k, n] contiguous, what npu_grouped_matmul takes."""
    return weight.transpose(1, 2).contiguous()


def _gmm(x: torch.Tensor, weight: torch.Tensor, group_list: torch.Tensor, out_dtype: torch.dtype,
         **quant: Any) -> torch.Tensor:
    """One npu_grouped_matmul call: single x [M, k], single weight [E, k, n] -> [M, n]."""
    return torch_npu().npu_grouped_matmul([x], [weight], group_list=group_list.to(torch.int64),
                                          split_item=2, group_type=0, group_list_type=0,
                                          output_dtype=out_dtype, **quant)[0]


def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, group_list: torch.Tensor) -> torch.Tensor:
    """x [M, k] (rows of expert e at group_list[e-1]:group_list[e]) @ weight[e] [k, n] -> [M, n]."""
    return _gmm(x, weight, group_list, x.dtype)


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


# ------------------------------------------------------------------------------- W8A8_DYNAMIC

def scale_dtype_for(act_dtype: torch.dtype) -> torch.dtype:
    """npu_grouped_matmul pertoken int8: bfloat16 scale -> bfloat16 output, float32 -> float16."""
    return torch.bfloat16 if act_dtype == torch.bfloat16 else torch.float32


def prepare_w8a8_dynamic(layer: nn.Module) -> None:
    """W8A8DynamicMoEMethod layer: int8 [E, n, k] -> [E, k, n] NZ; scales [E, n] in the scale dtype."""
    dtype = scale_dtype_for(layer.params_dtype)
    for proj in _PROJS:
        weight = getattr(layer, f"{proj}_weight").data                                  # [E, n, k] int8
        setattr(layer, f"{proj}_weight", _frozen(to_nz(prepare_expert_weights(weight))))  # [E, k, n] NZ
        scale = getattr(layer, f"{proj}_scale_fp32")                                    # [E, n] fp32
        layer.register_buffer(f"npu_{proj}_scale", scale.to(dtype).contiguous(), persistent=False)


def _int8_gmm(layer: nn.Module, proj: str, x: torch.Tensor, group_list: torch.Tensor) -> torch.Tensor:
    q, token_scale = torch_npu().npu_dynamic_quant(x)                                  # [M, k], [M]
    return _gmm(q, getattr(layer, f"{proj}_weight"), group_list, x.dtype,
                scale=[getattr(layer, f"npu_{proj}_scale")], per_token_scale=[token_scale])


def run_w8a8_dynamic(layer: nn.Module, x: torch.Tensor, group_list: torch.Tensor) -> torch.Tensor:
    """x [M, H] sorted by expert -> [M, H]: int8 gate_up, SwiGLU, int8 down."""
    h = _int8_gmm(layer, "w13", x, group_list)                                         # [M, 2I]
    a = layer.silu_and_mul(h)                                                           # [M, I]
    return _int8_gmm(layer, "w2", a, group_list)                                        # [M, H]


# --------------------------------------------------------------------------- weight-only int8/int4

def _int4_expert_weights(packed: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [E, n, ceil(k/2)] (`pack_int4` per expert) -> int32 [E, k, n / 8] int4-packed."""
    npu = torch_npu()
    experts = []
    for e in range(packed.shape[0]):
        codes = P.unpack_int4(packed[e], k)                                             # [n, k] int8
        experts.append(npu.npu_convert_weight_to_int4pack(codes.t().contiguous().to(torch.int32)))
    return torch.stack(experts)                                                         # [E, k, n / 8]


def prepare_weight_only(layer: nn.Module) -> None:
    """Online / pre-quantized wint8 / wint4 experts -> [E, k, n] int8 or int32 [E, k, n / 8]
    int4-packed weights and antiquant_scale [E, n] in the activation dtype."""
    for proj in _PROJS:
        weight = getattr(layer, f"{proj}_weight").data
        if layer.quant_bits == 4:
            npu_weight = _int4_expert_weights(weight, layer.expert_k[proj])
        else:
            npu_weight = prepare_expert_weights(weight)                                 # [E, k, n] int8
        setattr(layer, f"{proj}_weight", _frozen(npu_weight))
        scale = getattr(layer, f"{proj}_weight_scale").data                             # [E, n]
        layer.register_buffer(f"npu_{proj}_antiquant_scale", scale.to(layer.params_dtype).contiguous(),
                              persistent=False)


def run_weight_only(layer: nn.Module, x: torch.Tensor, group_list: torch.Tensor) -> torch.Tensor:
    """x [M, H] sorted by expert -> [M, H] through two pseudo-quant grouped matmuls and SwiGLU."""
    def gmm(proj: str, a: torch.Tensor) -> torch.Tensor:
        return _gmm(a, getattr(layer, f"{proj}_weight"), group_list, a.dtype,
                    antiquant_scale=[getattr(layer, f"npu_{proj}_antiquant_scale")])
    return gmm("w2", layer.silu_and_mul(gmm("w13", x)))


# ---------------------------------------------------------------------------------- supports

def supports_fused_experts(scheme: str) -> Any:
    """`supports` of the `fused_experts` kernel for `scheme` (w8a8_dynamic | weight_only).

    Traits: scheme, dtype (activations), bits (weight-only: 4 / 8), hidden_size and
    intermediate_size (per rank; int4 packs eight codes per int32 along n)."""
    def supports(scheme: str | None = None, dtype: torch.dtype | None = None, bits: int | None = None,
                 hidden_size: int | None = None, intermediate_size: int | None = None,
                 **_: Any) -> str | None:
        if scheme != wanted:
            return f"scheme={scheme!r} (this kernel: {wanted!r})"
        if dtype not in NPU_ACT_DTYPES:
            return f"dtype={dtype} (quantized npu_grouped_matmul takes float16/bfloat16 activations)"
        if is_310p():
            return ("310P (Atlas inference series): npu_grouped_matmul takes no scale / "
                    "per_token_scale / antiquant_scale there (float16 only)")
        if wanted == "weight_only":
            return _weight_only_reason(bits, hidden_size, intermediate_size)
        return None
    wanted = scheme
    return supports


def _weight_only_reason(bits: int | None, hidden_size: int | None,
                        intermediate_size: int | None) -> str | None:
    if bits not in (4, 8):
        return f"bits={bits} (npu_grouped_matmul pseudo-quant weights: int8 and int4)"
    if bits == 4:
        for name, n in (("2 * intermediate_size", 2 * (intermediate_size or 0)), ("hidden_size", hidden_size or 0)):
            if n % 8:
                return f"int4 needs output sizes divisible by 8 (eight int4 per int32): {name}={n}"
    return None
