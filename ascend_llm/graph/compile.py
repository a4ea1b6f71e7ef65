"""torch.compile of a decode step: the torchair (GE graph) backend on Ascend when torchair is
installed, inductor elsewhere; `enforce_eager` turns compilation off.

The engine uses it for vllm-ascend's torchair graph mode (`additional_config=
{"torchair_graph_config": {"enabled": true}}`): `ascend_llm.graph.model_graphs` compiles the
decode step once per batch bucket and calls it on the bucket's static buffers instead of
replaying an ACL graph. Checked with a stand-in torchair whose backend runs the traced FX graph
(torchair needs CANN); how the real GE backend treats the host-length graph breaks around the
attention is unknown until it runs on hardware.
"""
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


def require_torchair(backend: str) -> None:
    """ValueError unless torchair graph mode can run: the npu backend with torchair installed."""
    if backend != "npu":
        raise ValueError(f"additional_config.torchair_graph_config.enabled: torchair graph mode needs "
                         f"--device npu, not {backend!r}")
    if importlib.util.find_spec("torchair") is None:
        raise ValueError("additional_config.torchair_graph_config.enabled: torchair is not installed "
                         "(it ships with torch_npu's CANN toolkit builds); drop the option to use ACL graphs")


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
