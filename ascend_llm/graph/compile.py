"""torch.compile of a decode step: the torchair (GE graph) backend on Ascend when torchair is
installed, inductor elsewhere; `enforce_eager` turns compilation off."""
from __future__ import annotations

import importlib
import importlib.util
import logging
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)


def torchair_backend() -> Any | None:
    """torchair's NPU compile backend, or None when torchair is not installed."""
    if importlib.util.find_spec("torchair") is None:
        return None
    torchair = importlib.import_module("torchair")
    return torchair.get_npu_backend(compiler_config=torchair.CompilerConfig())


def compile_decode_step(fn: Callable[..., Any], backend: str, enforce_eager: bool) -> Callable[..., Any]:
    """`fn` compiled for `backend` (npu: torchair; cpu/cuda: inductor), or `fn` itself when
    `enforce_eager` or when the NPU has no torchair (logged)."""
    if enforce_eager:
        return fn
    if backend == "npu":
        npu_backend = torchair_backend()
        if npu_backend is None:
            logger.info("torchair is not installed; the NPU decode step runs eagerly (or as an ACL graph)")
            return fn
        return torch.compile(fn, backend=npu_backend, dynamic=False, fullgraph=False)
    return torch.compile(fn, dynamic=False)
