"""Triton kernels of the CUDA backend, one file per kernel family.

- `norm_rope_act`: RMSNorm (+ residual add), neox rotary embedding, SiLU-and-mul;
- `int8_gemm`: W8A8 activation quantization (static per-tensor, dynamic per-token) and the
  int8 x int8 -> int32 GEMM with fused dequant;
- `weight_only`: int8 / int4 weights x float activations (split-K GEMV for decode, tiled GEMM);
- `weight_only_group`: the same with group-wise scales and zero points (compressed-tensors
  W4A16 / W8A16);
- `fp8`: per-token-group e4m3 activation quantization, 128x128 block-fp8 GEMM, and the
  `torch._scaled_mm` wrappers of per-tensor fp8;
- `hadamard`: the online block-diagonal Hadamard rotation (`hadamard_transform`), a GEMM whose
  +-1 tiles are made from their indices;
- `paged_attention`: KV-cache write and prefill + decode attention over the block table
  (float, fp8 or int8 cache).

Every module imports triton at import time; `ascend_llm.ops.cuda` imports them only when
triton is installed. Each launcher takes tensors on one device: CUDA tensors on a GPU, or
CPU tensors under `TRITON_INTERPRET=1` (how CI checks them against `ops/cpu*.py`).
"""
from __future__ import annotations

import importlib.util


def triton_available() -> bool:
    """Whether the `triton` package can be imported (it is not imported here)."""
    return importlib.util.find_spec("triton") is not None
