"""Installs the torch_npu emulation in a process the tests spawn (tensor-parallel worker ranks).

Tests set ASCEND_LLM_TORCH_NPU_MODULE=tests.ops.npu_shim (spawned processes inherit it), so a
rank's first torch_npu import (ascend_llm.platform.import_torch_npu) imports this module, which
puts a FakeTorchNPU in `sys.modules["torch_npu"]` and `torch.npu`, as installing torch_npu on an
Atlas host would give the real one. transformers settles its own torch_npu checks first (no
torch_npu: as in the test process, which imports transformers before installing the emulation);
otherwise it would take the stand-in for a real torch_npu and import NPU kernels it lacks.
"""
import sys

import torch
import transformers.activations  # noqa: F401  (runs transformers' flash-attention / NPU probes)
from transformers.utils import is_torch_npu_available

from tests.ops.npu_emulation import FakeTorchNPU

if "torch_npu" not in sys.modules:
    is_torch_npu_available(), is_torch_npu_available(check_device=True)   # cached: False
    _fake = FakeTorchNPU("Ascend910B1")
    torch.npu = _fake.npu
    sys.modules["torch_npu"] = _fake
