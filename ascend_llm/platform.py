"""Backend detection: auto picks npu (torch_npu importable and a device present), then cuda, then cpu."""
from __future__ import annotations

import ctypes
import importlib
import importlib.util
import logging
import os
import sys
from types import ModuleType
from typing import Mapping, MutableMapping

import torch

logger = logging.getLogger(__name__)

# names a module to import instead of torch_npu; importing it must install sys.modules["torch_npu"]
TORCH_NPU_MODULE_ENV = "ASCEND_LLM_TORCH_NPU_MODULE"


def env_choice(name: str, choices: tuple[str, ...], default: str,
               environ: Mapping[str, str] = os.environ) -> str:
    """The value of environment variable `name` (lower-cased; `default` when unset or blank),
    ValueError naming the variable and the accepted values when it is not one of `choices`."""
    value = environ.get(name, "").strip().lower() or default
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(choices)}")
    return value


def import_torch_npu() -> ModuleType | None:
    """The torch_npu module, or None when it is not installed or fails to import.

    The only place the process imports torch_npu (installing it without CANN breaks
    `import torch`, so it is never a hard dependency). A module already in `sys.modules`
    (the real one, or the test emulation) is returned as is.
    """
    module = sys.modules.get("torch_npu")
    if module is not None:
        return module
    stand_in = os.environ.get(TORCH_NPU_MODULE_ENV)
    if stand_in:     # a module that installs a torch_npu (the tests' emulation in spawned ranks)
        importlib.import_module(stand_in)
        return sys.modules.get("torch_npu")
    if importlib.util.find_spec("torch_npu") is None:
        return None
    try:
        return importlib.import_module("torch_npu")   # registers torch.npu
    except Exception as exc:  # a broken CANN install must not take the CPU path down
        logger.warning("torch_npu is installed but failed to import: %s", exc)
        return None


def npu_available() -> bool:
    """True when torch_npu imports and reports a device."""
    if import_torch_npu() is None:
        return False
    npu = getattr(torch, "npu", None)
    return bool(npu is not None and npu.is_available())


def torch_device(backend: str) -> torch.device:
    """The torch device that holds a backend's tensors.

    npu: `npu:<current device>` from torch_npu; a stand-in torch_npu (the test emulation) may
    name another device through its `emulated_device` attribute (the emulation keeps tensors
    on the CPU).
    """
    if backend != "npu":
        return torch.device(backend)
    torch_npu = import_torch_npu()
    if torch_npu is None:
        raise ValueError("device: 'npu' requested but torch_npu is not installed or fails to import")
    emulated = getattr(torch_npu, "emulated_device", None)
    if emulated is not None:
        return torch.device(emulated)
    return torch.device("npu", torch.npu.current_device())


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (torch.cuda / torch.npu / torch.cpu `synchronize`);
    a no-op for a device module without one (the NPU emulation keeps tensors on the CPU)."""
    module = getattr(torch, device.type, None)
    sync = getattr(module, "synchronize", None)
    if callable(sync):
        sync()


def resolve_device(device: str) -> str:
    """Map `auto|npu|cuda|cpu` to an available backend name, or raise ValueError."""
    if device == "auto":
        if npu_available():
            return "npu"
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "npu" and not npu_available():
        raise ValueError("device: 'npu' requested but torch_npu is not installed or sees no NPU")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' requested but torch sees no CUDA device")
    return device


def resolve_dtype(dtype: str, backend: str, hf_config: object) -> torch.dtype:
    """`auto`: float32 on CPU (fast and exact there), the checkpoint's dtype elsewhere."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if backend == "cpu":
        return torch.float32
    config_dtype = getattr(hf_config, "torch_dtype", None) or getattr(hf_config, "dtype", None)
    if isinstance(config_dtype, str):
        config_dtype = getattr(torch, config_dtype, None)
    if config_dtype in (torch.float16, torch.bfloat16):
        return config_dtype
    return torch.bfloat16


# oneDNN's primitive cache and ideep's per-thread computation cache (behind torch's mkldnn linear)
# keep one entry per input shape, 1024 each by default, ~0.2-0.3 MiB an entry. A server's steps
# have a new row count every few steps (prefill chunks plus decode rows), so both kept filling: in a
# 24-way soak the heap in use grew ~80 MiB per 100 requests; capped at 128 it stayed flat after the
# first 100 (a new row count costs ~2 ms per linear shape to rebuild, once it has been evicted).
ONEDNN_CACHE_ENV_VARS = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
SERVER_ONEDNN_CACHE_CAPACITY = 128


def bound_onednn_caches(capacity: int = SERVER_ONEDNN_CACHE_CAPACITY,
                        environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Cap oneDNN's primitive cache and ideep's computation cache at `capacity` entries each,
    unless the user set them; both are read at the first oneDNN call, so call this before the
    model loads. Returns the settings in effect."""
    for name in ONEDNN_CACHE_ENV_VARS:
        if not environ.get(name, "").strip():
            environ[name] = str(capacity)
    settings = {name: environ[name] for name in ONEDNN_CACHE_ENV_VARS}
    logger.debug("oneDNN shape caches: %s", settings)
    return settings


def release_free_heap() -> None:
    """Return freed heap pages to the OS (glibc malloc_trim); a no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        logger.debug("malloc_trim unavailable; freed heap stays resident until reused")
