"""The torch_npu module object and device facts the NPU kernels need.

torch_npu is looked up when a kernel runs, never at import: this package must import (and the
CPU backend run) on machines without CANN. None of the NPU kernels has run on Ascend hardware
yet; they are written against the documented torch_npu op semantics and tested through the
emulation in `tests/ops/npu_emulation.py`.
"""
from __future__ import annotations

from types import ModuleType

import torch

from ascend_llm.platform import import_torch_npu

ACL_FORMAT_FRACTAL_NZ = 29        # npu_format_cast target of matmul weights


def torch_npu() -> ModuleType:
    """The imported torch_npu module; ValueError if it is unavailable."""
    module = import_torch_npu()
    if module is None:
        raise ValueError("backend npu: torch_npu is not installed or failed to import")
    return module


def is_310p() -> bool:
    """Whether the device is an Atlas inference-series (310P) card, which lacks bf16 int8 matmul
    outputs, per-token scales and fused infer attention."""
    return "310P" in torch.npu.get_device_name(0)


def to_nz(weight: torch.Tensor) -> torch.Tensor:
    """A matmul weight [k, n] made contiguous and cast to FRACTAL_NZ."""
    return torch_npu().npu_format_cast(weight.contiguous(), ACL_FORMAT_FRACTAL_NZ)


def storage_format(t: torch.Tensor) -> str:
    """The NPU storage format of `t` (torch_npu.get_npu_format): FRACTAL_NZ, ND or the ACL number."""
    try:
        code = int(torch_npu().get_npu_format(t))
    except RuntimeError:                 # a tensor without NPU storage (e.g. a fake / meta tensor)
        return "storage format unknown"
    return {ACL_FORMAT_FRACTAL_NZ: "FRACTAL_NZ", 2: "ND"}.get(code, f"ACL format {code}")


def deq_scale_int64(scale: torch.Tensor) -> torch.Tensor:
    """float32 per-channel scales [n] -> int64 [n] holding the float32 bits in the low 32 bits,
    the `scale` form npu_quant_matmul takes for float16 outputs (msModelSlim / MindIE)."""
    return scale.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
