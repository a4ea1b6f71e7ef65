"""CPU reference kernels of the quantized ops (filled in as quantization methods land)."""
from __future__ import annotations

from ascend_llm.ops.registry import OpRegistry


def register(registry: OpRegistry) -> None:
    """Register the quantized-op reference kernels."""
