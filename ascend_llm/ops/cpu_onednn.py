"""Optimised CPU kernels through oneDNN (bundled with PyTorch). Tested against ops/cpu.py.

On AMD EPYC, oneDNN's linear with a weight pre-packed into its blocked layout runs 2-3x faster
than the MKL sgemm behind F.linear on batched inputs (~300-400 vs ~120-180 GFLOP/s at 32-2048
tokens) and stays IEEE fp32. On Intel CPUs MKL is faster at decode and these kernels step
aside (ops/cpu_linear_choice.py). In bfloat16 they need AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT;
without (AMD Zen 3, or ASCEND_LLM_CPU_ISA=avx2) they step aside, logged once, for F.linear in
ops/cpu_bf16.py (the decision: ops/cpu_features.py).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ascend_llm.ops.cpu_features import cpu_features, log_step_aside
from ascend_llm.ops.cpu_linear_choice import ENV_VAR, cpu_vendor, onednn_preferred
from ascend_llm.ops.registry import Kernel, OpRegistry

_PACK_BATCH_HINT = 32   # oneDNN picks the blocked layout for this many rows; any row count works


def _supports_linear(dtype: torch.dtype | None = None, shared_weight: bool = False,
                     **traits: Any) -> str | None:
    if shared_weight:
        return "the weight is shared (e.g. a tied LM head) and must keep its dense layout"
    return _supports_dense_linear(dtype)


def _supports_dense_linear(dtype: torch.dtype | None = None, **traits: Any) -> str | None:
    reason = onednn_unavailable(dtype)
    if reason is None:
        reason = cpu_features().onednn_unavailable(dtype)
        if reason is not None:
            log_step_aside("oneDNN linear", reason, "F.linear (ops/cpu_bf16.py)")
    if reason is None and not onednn_preferred():
        reason = (f"MKL's F.linear is faster on this CPU ({cpu_vendor() or 'unknown vendor'}); "
                  f"{ENV_VAR}=onednn forces oneDNN")
    return reason


def onednn_unavailable(dtype: torch.dtype | None) -> str | None:
    """Why this torch build cannot run oneDNN linear in `dtype`, or None if it can."""
    if not torch.backends.mkldnn.is_available():
        return "oneDNN (mkldnn) is not available in this torch build"
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return "this torch build lacks mkldnn._reorder_linear_weight"
    if dtype not in (torch.float32, torch.bfloat16):
        return f"dtype {dtype} is not float32/bfloat16"
    return None


def prepare_linear(layer: nn.Module) -> None:
    """Replace layer.weight [out, in] by its oneDNN-packed form (same logical shape)."""
    packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach().contiguous(), _PACK_BATCH_HINT)
    layer.weight = nn.Parameter(packed, requires_grad=False)


def linear(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x: [num_tokens, in] -> [num_tokens, out] against the packed weight."""
    if x.shape[0] == 1:
        # oneDNN's single-row path on packed weights is ~10x slower than its two-row path,
        # which streams the weight at ~2x MKL's GEMV bandwidth: duplicate the row.
        out = torch.ops.mkldnn._linear_pointwise(x.expand(2, -1).contiguous(), layer.weight, bias,
                                                 "none", [], "")
        return out[:1]
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), layer.weight, bias, "none", [], "")


def dense_linear(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN on the unpacked weight: no copy, so a tied LM head stays shared with the embedding;
    still ~2x MKL at 1-32 rows (weight streaming ~25 GB/s vs ~12 on the CI machine)."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), layer.weight, bias, "none", [], "")


def register(registry: OpRegistry) -> None:
    registry.register(Kernel("linear", "cpu", "cpu.onednn_linear", linear, _supports_linear,
                             prepare_linear, priority=10))
    registry.register(Kernel("linear", "cpu", "cpu.onednn_dense_linear", dense_linear,
                             _supports_dense_linear, priority=5))
