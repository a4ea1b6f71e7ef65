"""NPU kernel of `hadamard_transform(x, block_size)` (see ops/cpu_hadamard.py for the op).

torch_npu has no Hadamard op we can rely on, so the rotation is one batched matmul on the cube
unit: x viewed [rows, b] times H_b, cached on the device in x's dtype (the NPU matmul takes
matching fp16 / bf16 operands and accumulates in fp32). H_b's entries +-1/sqrt(b) round once to
that dtype: exact for b a power of 4; for b = 512, 1/sqrt(512) in bf16 is 1.1e-4 relative low, a
common scale far below one bf16 step (3.9e-3). Plain torch ops, no torch_npu call: tested through
the emulated torch_npu like the other NPU kernels (tests/ops/test_hadamard.py), never on hardware.
"""
from __future__ import annotations

from ascend_llm.ops.cpu_hadamard import OP, HadamardMatmul, supports_hadamard
from ascend_llm.ops.registry import Kernel, OpRegistry


def register(registry: OpRegistry) -> None:
    """Register the device matmul kernel (above the reference fallback)."""
    run = HadamardMatmul(matrix_dtype=None)
    registry.register(Kernel(OP, "npu", "npu.hadamard_batch_matmul", run, supports_hadamard, run.prepare))
