"""Backend op registry. `build_registry()` returns a fresh registry with every
available backend's kernels; backends whose runtime is missing register nothing."""
from __future__ import annotations

import importlib
import logging

import torch

from ascend_llm.ops import collectives
from ascend_llm.ops.attention_metadata import AttentionMetadata
from ascend_llm.ops.registry import REFERENCE_PRIORITY, Kernel, OpRegistry, OpSet

logger = logging.getLogger(__name__)

# backend -> module holding a `register(registry)` function; imported only when asked for
_BACKEND_MODULES = {"cpu": "ascend_llm.ops.cpu", "cuda": "ascend_llm.ops.cuda", "npu": "ascend_llm.ops.npu"}
# Ops a backend has no kernel of yet run as the plain-torch reference kernels on its device.
_REFERENCE_FALLBACK = ("cuda", "npu")
# further modules registering kernels of a backend (kept out of the backend's main module)
_EXTRA_MODULES = {"cpu": ("ascend_llm.ops.cpu_moe", "ascend_llm.ops.cpu_fused", "ascend_llm.ops.cpu_logits",
                          "ascend_llm.ops.cpu_int8_gemm")}


def _register_backend(registry: OpRegistry, backend: str) -> None:
    importlib.import_module(_BACKEND_MODULES[backend]).register(registry)
    for module_name in _EXTRA_MODULES.get(backend, ()):
        importlib.import_module(module_name).register(registry)


def build_registry(backends: tuple[str, ...] = ("cpu",)) -> OpRegistry:
    """A registry holding the kernels of `backends` (unknown or unavailable ones are skipped)."""
    registry = OpRegistry()
    for backend in backends:
        module_name = _BACKEND_MODULES.get(backend)
        if module_name is not None:
            _register_backend(registry, backend)
            collectives.register(registry, backend)      # all_reduce / all_gather (torch.distributed)
        if backend in _REFERENCE_FALLBACK:
            _register_reference_fallback(registry, backend)
    return registry


def _register_reference_fallback(registry: OpRegistry, backend: str) -> None:
    reference = OpRegistry()
    _register_backend(reference, "cpu")
    for (op, _), kernels in reference.kernels.items():
        for k in (k for k in kernels if not k.host_only):
            registry.register(Kernel(op, backend, f"{backend}.torch_reference.{op}", k.run,
                                     k.supports, k.prepare, priority=REFERENCE_PRIORITY))


def weight_layout(backend: str, tensor: "torch.Tensor") -> str:
    """dtype, shape and, on the NPU, the storage format (FRACTAL_NZ / ND) of a layer's weight."""
    layout = f"{str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}"
    if backend == "npu":
        from ascend_llm.ops.npu_runtime import storage_format
        layout += f" {storage_format(tensor)}"
    return layout


def build_op_set(backend: str) -> OpSet:
    """The op set that layers use on `backend`."""
    return OpSet(build_registry((backend,)), backend)


__all__ = ["AttentionMetadata", "Kernel", "OpRegistry", "OpSet", "build_op_set", "build_registry",
           "weight_layout"]
