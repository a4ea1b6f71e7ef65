"""The Ascend NPU backend: torch_npu kernels, registered when `--device npu` is chosen.

The backend is available only when torch_npu imports and `torch.npu.is_available()`
(`ascend_llm.platform.npu_available`); torch_npu is looked up lazily, when a kernel runs
(`npu_runtime.torch_npu`), so importing this package never needs CANN.

Status: written from the torch_npu / vllm-ascend documentation and verified only against the
emulated torch_npu in `tests/ops/npu_emulation.py`; it has not run on Ascend hardware yet.
Ops without an NPU kernel here (float `linear`, `sample`) run the plain-torch reference on the
NPU device (`ascend_llm.ops._REFERENCE_FALLBACK`).
"""
from __future__ import annotations

from ascend_llm.ops import npu_attention as attention
from ascend_llm.ops import npu_hadamard as hadamard
from ascend_llm.ops import npu_linear as linear
from ascend_llm.ops import npu_moe as moe
from ascend_llm.ops import npu_norm as norm
from ascend_llm.ops.registry import Kernel, OpRegistry

BACKEND = "npu"


def register(registry: OpRegistry) -> None:
    """Register every NPU kernel (above the reference fallback, which stays for other ops)."""
    for fn in (norm.rms_norm, norm.add_rms_norm, norm.add_rms_norm_quant, norm.rope, norm.silu_and_mul,
               linear.quantize_per_tensor, linear.dynamic_quant_per_token, moe.grouped_matmul):
        op = fn.__name__
        registry.register(Kernel(op, BACKEND, f"npu.{op}", fn))
    registry.register(Kernel("reshape_and_cache", BACKEND, "npu.reshape_and_cache",
                             attention.reshape_and_cache, attention.supports_float_kv))
    paged_attention = attention.PagedAttention()
    registry.register(Kernel("paged_attention", BACKEND, "npu.fused_infer_attention",
                             paged_attention, attention.supports_float_kv))
    registry.register(Kernel("reshape_and_cache", BACKEND, "npu.reshape_and_cache_int8",
                             attention.reshape_and_cache_int8, attention.supports_int8_kv, priority=10))
    registry.register(Kernel("paged_attention", BACKEND, "npu.fused_infer_attention_int8",
                             paged_attention, attention.supports_int8_kv, priority=10))
    _register_linear(registry)
    _register_moe(registry)
    hadamard.register(registry)


def _register_moe(registry: OpRegistry) -> None:
    for scheme, prepare, run in (("w8a8_dynamic", moe.prepare_w8a8_dynamic, moe.run_w8a8_dynamic),
                                 ("weight_only", moe.prepare_weight_only, moe.run_weight_only)):
        registry.register(Kernel("fused_experts", BACKEND, f"npu.grouped_matmul_{scheme}", run,
                                 moe.supports_fused_experts(scheme), prepare))


def _register_linear(registry: OpRegistry) -> None:
    for scheme, prepare, run in (("static", linear.prepare_w8a8_static, linear.run_w8a8_static),
                                 ("dynamic", linear.prepare_w8a8_dynamic, linear.run_w8a8_dynamic),
                                 ("w8a16", linear.prepare_w8a16, linear.run_weight_quant)):
        registry.register(Kernel("w8a8_linear", BACKEND, f"npu.w8a8_{scheme}", run,
                                 linear.supports_w8a8(scheme), prepare))
    registry.register(Kernel("weight_only_matmul", BACKEND, "npu.weight_quant_batchmatmul",
                             linear.run_weight_quant, linear.supports_weight_only,
                             linear.prepare_weight_only))
    registry.register(Kernel("weight_only_group_matmul", BACKEND, "npu.weight_quant_batchmatmul_group",
                             linear.run_weight_only_group, linear.supports_weight_only_group,
                             linear.prepare_weight_only_group))
