"""NPU kernels of the element-wise ops: RMSNorm, add + RMSNorm, rotary embedding, SiLU-and-mul."""
from __future__ import annotations

import torch

from ascend_llm.ops.npu_runtime import torch_npu


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [num_tokens, hidden] -> same shape (npu_rms_norm; weight in x's dtype)."""
    return torch_npu().npu_rms_norm(x, weight.to(x.dtype), eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one npu_add_rms_norm."""
    normed, _, summed = torch_npu().npu_add_rms_norm(x, residual, weight.to(x.dtype), eps)
    return normed, summed


def add_rms_norm_quant(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       scale: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 round(rms_norm(x + residual) / scale + offset), x + residual) in one
    npu_add_rms_norm_quant, the fusion vllm-ascend applies before a W8A8 static linear.
    scale / offset: the layer's per-tensor input_scale / input_offset (0-dim)."""
    k = x.shape[-1]
    scales = scale.float().reshape(1).repeat(k)                                  # [k] float32
    zero_points = offset.to(torch.int32).reshape(1).repeat(k)                    # [k] int32
    q, _, summed = torch_npu().npu_add_rms_norm_quant(x, residual, weight.to(x.dtype), scales, zero_points,
                                                      epsilon=eps, div_mode=True)
    return q, summed


def rope(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox rotary embedding with npu_rotary_mul (x * cos + rotate_half(x) * sin).

    query [T, H, D], key [T, Hkv, D]; cos [T, 1, D] = (cos | cos) and sin [T, 1, D] = (-sin | sin)
    as RotaryEmbedding gives them; npu_rotary_mul takes the plain (sin | sin), so the sign of
    the first half is undone here. Tensors go in as BSND with B = 1.
    """
    half = sin.shape[-1] // 2
    r1 = cos.to(query.dtype).unsqueeze(0)                                       # [1, T, 1, D]
    r2 = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1).to(query.dtype).unsqueeze(0)
    npu = torch_npu()
    q = npu.npu_rotary_mul(query.unsqueeze(0), r1, r2).squeeze(0)
    k = npu.npu_rotary_mul(key.unsqueeze(0), r1, r2).squeeze(0)
    return q, k


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, 2 * d] (gate | up) -> silu(gate) * up with npu_swiglu."""
    return torch_npu().npu_swiglu(x, dim=-1)
