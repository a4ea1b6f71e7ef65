"""The CUDA backend: Triton kernels (`ascend_llm/ops/triton/`) registered for `--device cuda`.

Importing this module needs neither triton nor a GPU: `register` imports the kernel modules
only when the runtime is there, i.e. triton is installed and either a CUDA device exists or
`TRITON_INTERPRET=1` (Triton's CPU interpreter, how CI checks every kernel against
`ops/cpu*.py`). Otherwise it registers nothing and the backend keeps the plain-torch reference
kernels (`ops._REFERENCE_FALLBACK`, priority -100), which also serve the ops without a kernel
here: float `linear` (cuBLAS through F.linear is already at the limit), WINT2, `sample`.

fp8_matmul scheme "per_token" (row-wise: per-token activations x per-channel weights) is what
msModelSlim's WFP8AFP8_DYNAMIC and compressed-tensors' FP8_DYNAMIC select; its CPU reference is
`ops/cpu_quant.fp8_matmul_per_token`.

Status: checked on CPU through the interpreter only; GPU timings come from
`benchmarks/bench_cuda.py`.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any

import torch

from ascend_llm.ops.registry import Kernel, OpRegistry

logger = logging.getLogger(__name__)

BACKEND = "cuda"
PRIORITY = 10                      # above the reference fallback (-100)
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "int8")


def runtime_available() -> str | None:
    """None when the Triton kernels can run here, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install ascend-llm[cuda])"
    if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
        return None
    return "no CUDA device (and TRITON_INTERPRET is not 1)"


def _fp8_hardware() -> str | None:
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return None if (major, minor) >= (8, 9) else f"fp8 needs compute capability >= 8.9, got {major}.{minor}"


def supports_kv_cache(kv_cache_dtype: str = "auto", **_: Any) -> str | None:
    """Float cache, or an fp8 (e4m3) / int8 cache dequantized in the attention kernel."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        return f"kv_cache_dtype={kv_cache_dtype!r} is not one of {KV_CACHE_DTYPES}"
    return _fp8_hardware() if kv_cache_dtype.startswith("fp8") else None


def supports_weight_only(bits: int | None = None, **_: Any) -> str | None:
    """int8 and int4 weights (WINT2 has no Triton kernel yet: the reference runs it)."""
    return None if bits in (4, 8) else f"bits={bits} (Triton kernel supports 4 and 8)"


def supports_fp8(scheme: str) -> Any:
    """The trait check of one fp8_matmul scheme."""
    def supports(**traits: Any) -> str | None:
        got = traits.get("scheme")
        if got != scheme:
            return f"scheme={got!r} (supports {scheme!r})"
        return _fp8_hardware()
    return supports


def register(registry: OpRegistry) -> None:
    """Register every Triton kernel on "cuda" (nothing when the runtime is missing)."""
    reason = runtime_available()
    if reason is not None:
        logger.info("cuda backend: Triton kernels not registered: %s", reason)
        return
    from ascend_llm.ops.triton import (fp8, grouped_matmul, hadamard, int8_gemm, norm_rope_act, paged_attention,
                                      weight_only, weight_only_group)

    def add(op: str, name: str, run: Any, supports: Any = None, prepare: Any = None) -> None:
        extra = {k: v for k, v in (("supports", supports), ("prepare", prepare)) if v is not None}
        registry.register(Kernel(op, BACKEND, f"cuda.triton.{name}", run, priority=PRIORITY, **extra))

    for fn in (norm_rope_act.rms_norm, norm_rope_act.add_rms_norm, norm_rope_act.rope,
               norm_rope_act.silu_and_mul, int8_gemm.quantize_per_tensor,
               int8_gemm.dynamic_quant_per_token, int8_gemm.quant_matmul):
        add(fn.__name__, fn.__name__, fn)
    add("reshape_and_cache", "reshape_and_cache", paged_attention.reshape_and_cache, supports_kv_cache)
    add("paged_attention", "paged_attention", paged_attention.paged_attention, supports_kv_cache)
    add("grouped_matmul", "grouped_matmul", grouped_matmul.grouped_matmul,
        grouped_matmul.supports_grouped_matmul)
    add("weight_only_matmul", "weight_only_matmul", weight_only.weight_only_matmul,
        supports_weight_only, weight_only.prepare_weight_only)
    add("weight_only_group_matmul", "weight_only_group_matmul", weight_only_group.weight_only_group_matmul,
        weight_only_group.supports_weight_only_group, weight_only_group.prepare_weight_only_group)
    add("hadamard_transform", "hadamard_transform", hadamard.hadamard_transform, hadamard.supports_hadamard)
    add("fp8_matmul", "fp8_matmul_block", fp8.fp8_matmul_block, supports_fp8("block"), fp8.prepare_block)
    add("fp8_matmul", "fp8_matmul_per_tensor", fp8.fp8_matmul_per_tensor, supports_fp8("per_tensor"),
        fp8.prepare_per_tensor)
    add("fp8_matmul", "fp8_matmul_per_tensor_static", fp8.fp8_matmul_per_tensor_static,
        supports_fp8("per_tensor_static"), fp8.prepare_per_tensor)
    add("fp8_matmul", "fp8_matmul_per_token", fp8.fp8_matmul_per_token, supports_fp8("per_token"),
        fp8.prepare_per_token)
