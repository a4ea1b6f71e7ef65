"""The CPU or CUDA op set for the Triton model tests (import after `pytest.importorskip("triton")`)."""
from __future__ import annotations

from ascend_llm.ops import build_registry, cuda
from ascend_llm.ops.registry import OpSet


def op_set(backend: str) -> OpSet:
    """Kernels of `backend` ("cpu" or "cuda"); the CUDA kernels are registered here until "cuda"
    is one of ops/__init__'s backend modules."""
    registry = build_registry((backend,))
    if backend == "cuda" and not any(k.name.startswith("cuda.triton.")
                                     for ks in registry.kernels.values() for k in ks):
        cuda.register(registry)
    return OpSet(registry, backend)
