"""Op registry: op name -> per-backend kernels, selected once per layer.

A `Kernel` says whether it can run a given configuration (`supports`), may
re-layout a layer's weights for its backend (`prepare`), and computes (`run`).
`select` returns the first supporting kernel in priority order, or raises with
every rejection reason so a user sees why nothing fits. When the kernel chosen is a backend's
plain-torch reference fallback (priority `REFERENCE_PRIORITY`: the backend has no kernel of its
own for the op, or each one rejected the traits), the step-aside is logged once per registry with
the reasons, so a user sees which layers do not run the backend's kernels and why.

`OpSet.bind(layer, op, **traits)` selects as `select` does and records the choice on the layer
(`layer.kernel_choices`: the kernel, how it computes, and every kernel rejected on the way), which
the per-layer quantization audit (`quant/audit.py`) and strict mode read.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch.nn as nn

logger = logging.getLogger(__name__)

SupportsFn = Callable[..., "str | None"]
REFERENCE_PRIORITY = -100          # plain-torch reference kernels: ops._REFERENCE_FALLBACK, and CPU
                                   # references that emulate low-bit arithmetic (cpu.quant_matmul)


def _always(**traits: Any) -> str | None:
    return None


def _no_prepare(layer: nn.Module) -> None:
    return None


@dataclass(frozen=True, slots=True)
class Kernel:
    """One backend's implementation of an op. `dequantizes`: it decodes quantized weights to a
    float tensor and runs a float matmul (no low-bit arithmetic), which strict mode reports.
    `host_only`: it computes on CPU tensors only (a host-ISA kernel), so it is never copied as
    another backend's plain-torch reference fallback."""
    op: str
    backend: str
    name: str
    run: Callable[..., Any]
    supports: SupportsFn = _always
    prepare: Callable[[nn.Module], None] = _no_prepare
    priority: int = 0
    dequantizes: bool = False
    host_only: bool = False

    @property
    def path(self) -> str:
        """How it computes: "reference" (a backend's plain-torch fallback), "dequantize" or "native"."""
        if self.priority <= REFERENCE_PRIORITY:
            return "reference"
        return "dequantize" if self.dequantizes else "native"


@dataclass(frozen=True, slots=True)
class KernelChoice:
    """The kernel `select` chose for one op of a layer, and why the ones before it were passed over."""
    op: str
    kernel: Kernel
    rejected: tuple[str, ...] = ()


@dataclass(slots=True)
class OpRegistry:
    """Holds kernels per (op, backend), highest priority first."""
    kernels: dict[tuple[str, str], list[Kernel]] = field(default_factory=dict)
    announced: set[tuple[str, str, str]] = field(default_factory=set)    # step-asides logged

    def register(self, kernel: Kernel) -> Kernel:
        entries = self.kernels.setdefault((kernel.op, kernel.backend), [])
        entries.append(kernel)
        entries.sort(key=lambda k: -k.priority)
        return kernel

    def ops(self, backend: str) -> list[str]:
        return sorted(op for op, b in self.kernels if b == backend)

    def select(self, op: str, backend: str, **traits: Any) -> Kernel:
        return self.choose(op, backend, **traits).kernel

    def choose(self, op: str, backend: str, **traits: Any) -> KernelChoice:
        """The first supporting kernel with the rejection reasons of those before it."""
        disabled = _disabled_kernels()
        reasons: list[str] = []
        own = 0                     # reasons[:own] are the backend's own kernels' (above the fallback)
        for kernel in self.kernels.get((op, backend), []):
            if kernel.name in disabled:
                reasons.append(f"{kernel.name}: disabled by ASCEND_LLM_DISABLE_KERNELS")
            else:
                reason = kernel.supports(**traits)
                if reason is None:
                    if kernel.priority <= REFERENCE_PRIORITY:
                        self._announce_step_aside(kernel, reasons[:own])
                    return KernelChoice(op, kernel, tuple(reasons))
                reasons.append(f"{kernel.name}: {reason}")
            own += kernel.priority > REFERENCE_PRIORITY
        if not reasons:
            reasons.append(f"no kernel registered for op {op!r} on backend {backend!r}")
        raise ValueError(f"no kernel can run op {op!r} on backend {backend!r} with "
                         f"{traits}: " + "; ".join(reasons))

    def _announce_step_aside(self, kernel: Kernel, reasons: list[str]) -> None:
        why = "; ".join(reasons) or f"no {kernel.backend} kernel is registered for it"
        key = (kernel.op, kernel.backend, why)
        if key in self.announced:
            return
        self.announced.add(key)
        logger.info("op %r on backend %r steps aside to the plain-torch reference %s: %s",
                    kernel.op, kernel.backend, kernel.name, why)


def _disabled_kernels() -> set[str]:
    value = os.environ.get("ASCEND_LLM_DISABLE_KERNELS", "")
    return {name.strip() for name in value.split(",") if name.strip()}


def kernel(registry: OpRegistry, op: str, backend: str, *, name: str | None = None,
           supports: SupportsFn = _always, prepare: Callable[[nn.Module], None] = _no_prepare,
           priority: int = 0) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register the decorated function as `op` on `backend`."""
    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        registry.register(Kernel(op, backend, name or f"{backend}.{fn.__name__}", fn,
                                 supports, prepare, priority))
        return fn
    return wrap


@dataclass(frozen=True, slots=True)
class OpSet:
    """The kernels of one backend, as handed to layers: `ops.get("rms_norm")` -> callable."""
    registry: OpRegistry
    backend: str

    def select(self, op: str, **traits: Any) -> Kernel:
        return self.registry.select(op, self.backend, **traits)

    def get(self, op: str, **traits: Any) -> Callable[..., Any]:
        return self.select(op, **traits).run

    def bind(self, layer: nn.Module, op: str, **traits: Any) -> Kernel:
        """`select`, recording the choice in `layer.kernel_choices` (one entry per op)."""
        choice = self.registry.choose(op, self.backend, **traits)
        choices = [c for c in getattr(layer, "kernel_choices", []) if c.op != op]
        layer.kernel_choices = choices + [choice]
        return choice.kernel
