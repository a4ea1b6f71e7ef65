"""Per-layer quantization audit: what each layer's checkpoint scheme is, which kernel the op
registry chose for it on this backend, how that kernel computes, and why others were passed over.

It answers "is my quantized model really running the low-bit kernels?": every Linear and MoE
layer (anything holding a `quant_method`) is listed with
- its scheme (e.g. "W8A8 static", "W4A16 g128", "FLOAT"),
- the kernels bound to it (`layer.kernel_choices`, recorded by `OpSet.bind`) with their path:
  "native" (low-bit arithmetic or the backend's quantized op), "dequantize" (weights decoded to
  float, then a float matmul) or "reference" (a backend's plain-torch fallback); a quantized layer
  that bound no registry kernel computes with its method's own torch code ("unbound"),
- its weight layout (dtype, shape, NPU storage format) and its bytes.
Strict mode (`check_strict`) refuses a model whose quantized layers do not all run native kernels.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn as nn

from ascend_llm.ops import weight_layout
from ascend_llm.ops.registry import KernelChoice

# quant method class -> the scheme name users know (msModelSlim / FastDeploy / compressed-tensors)
SCHEMES: dict[str, str] = {
    "UnquantizedLinearMethod": "FLOAT", "UnquantizedFusedMoEMethod": "FLOAT",
    "W8A8StaticLinearMethod": "W8A8 static", "CtW8A8StaticMethod": "W8A8 static",
    "W8A8DynamicLinearMethod": "W8A8_DYNAMIC", "CtW8A8DynamicMethod": "W8A8_DYNAMIC",
    "W8A8DynamicMoEMethod": "W8A8_DYNAMIC",
    "W8A16LinearMethod": "W8A16", "ModelSlimWeightOnlyMethod": "W{bits}A16",
    "GroupWeightOnlyLinearMethod": "W{bits}A16",
    "WeightOnlyLinearMethod": "wint{bits}", "PrequantWeightOnlyLinearMethod": "wint{bits}",
    "OnlineWeightOnlyMoEMethod": "wint{bits}", "PrequantWeightOnlyMoEMethod": "wint{bits}",
    "WInt2LinearMethod": "wint2", "WInt2MoEMethod": "wint2",
    "Fp8LinearMethod": "FP8 per-tensor", "Fp8CheckpointLinearMethod": "FP8 per-tensor",
    "BlockFp8LinearMethod": "FP8 block", "BlockFp8CheckpointLinearMethod": "FP8 block",
    "CtFp8BlockMethod": "FP8 block", "BlockFp8MoEMethod": "FP8 block",
    "CtFp8ChannelDynamicMethod": "FP8 per-channel dynamic",
    "WFp8AFp8DynamicLinearMethod": "W8A8FP8_DYNAMIC",
}
NATIVE = "native"


@dataclass(frozen=True)
class LayerAudit:
    """One layer: scheme, bound kernels (with their rejections), weight layout and bytes."""
    prefix: str
    scheme: str
    kernels: tuple[KernelChoice, ...]
    layout: str
    nbytes: int
    input_transform: str | None = None      # online rotation of the input, e.g. "hadamard(512)"

    @property
    def quantized(self) -> bool:
        return self.scheme != "FLOAT"

    @property
    def path(self) -> str:
        """The slowest path among its kernels; "unbound" for a quantized layer with none."""
        paths = {choice.kernel.path for choice in self.kernels}
        for path in ("reference", "dequantize"):
            if path in paths:
                return path
        return "unbound" if self.quantized and not self.kernels else NATIVE

    @property
    def kernel_names(self) -> str:
        return ", ".join(choice.kernel.name for choice in self.kernels) or "-"

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.prefix, "scheme": self.scheme, "path": self.path,
                "kernels": [{"op": c.op, "kernel": c.kernel.name, "path": c.kernel.path,
                             "rejected": list(c.rejected)} for c in self.kernels],
                "weight_layout": self.layout, "bytes": self.nbytes, "input_transform": self.input_transform}


def audit_model(model: nn.Module) -> list[LayerAudit]:
    """The audit of every layer holding a quant method, in module order."""
    return [audit for _, audit in audited_layers(model)]


def audited_layers(model: nn.Module) -> list[tuple[nn.Module, LayerAudit]]:
    """(layer, its audit) for every layer holding a quant method, in module order."""
    pairs = []
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if method is None:
            continue
        pairs.append((module, LayerAudit(getattr(module, "prefix", name) or name, _scheme(module, method),
                                         tuple(getattr(module, "kernel_choices", ())), _layout(module),
                                         _own_bytes(module), _input_transform(module))))
    return pairs


def _scheme(layer: nn.Module, method: Any) -> str:
    label = SCHEMES.get(type(method).__name__, type(method).__name__)
    bits = getattr(layer, "quant_bits", None) or getattr(method, "bits", None) or ""
    label = label.format(bits=bits)
    group, k = getattr(layer, "group_size", None), getattr(layer, "in_features_k", None)
    if isinstance(group, int) and group and k and group < k:
        label += f" g{group}"
    return label


def _input_transform(layer: nn.Module) -> str | None:
    block = getattr(layer, "input_hadamard_block", None)
    return f"hadamard({block})" if block else None


def _layout(layer: nn.Module) -> str:
    weight = next((getattr(layer, n) for n in ("weight", "w13_weight", "weight_packed", "quant_weight")
                   if isinstance(getattr(layer, n, None), torch.Tensor)), None)
    if weight is None:
        return "-"
    ops = getattr(layer, "ops", None)
    return weight_layout(ops.backend if ops is not None else "cpu", weight)


def _own_bytes(layer: nn.Module) -> int:
    tensors = list(layer.parameters(recurse=False)) + list(layer.buffers(recurse=False))
    return sum(t.numel() * t.element_size() for t in tensors)


def summary_line(audits: Iterable[LayerAudit]) -> str:
    """'210 layers: 180 W8A8 static -> npu.w8a8_static, 30 FLOAT -> cpu.onednn_linear'."""
    audits = list(audits)
    groups = Counter((a.scheme, a.kernel_names) for a in audits)
    parts = [f"{count} {scheme} -> {kernels}" for (scheme, kernels), count in
             sorted(groups.items(), key=lambda item: (-item[1], item[0]))]
    slow = sum(1 for a in audits if a.quantized and a.path != NATIVE)
    tail = f"; {slow} quantized layer(s) not on a native kernel" if slow else ""
    return f"{len(audits)} layers: " + ", ".join(parts) + tail


def strict_violations(audits: Iterable[LayerAudit]) -> list[str]:
    """One line per quantized layer that does not run the format's native kernel here (the kernels
    passed over and why are in `LayerAudit.to_dict`, `ascend-llm inspect --json`)."""
    lines = []
    for audit in audits:
        if not audit.quantized or audit.path == NATIVE:
            continue
        why = "; ".join(f"{c.op} runs {c.kernel.name} ({c.kernel.path})"
                        for c in audit.kernels if c.kernel.path != NATIVE)
        lines.append(f"{audit.prefix} [{audit.scheme}]: "
                     + (why or "no registry kernel bound: the method's own torch code"))
    return lines


def check_strict(audits: Iterable[LayerAudit]) -> None:
    """ValueError naming every quantized layer off its native kernel (`--quantization-strict`)."""
    lines = strict_violations(audits)
    if lines:
        raise ValueError(f"--quantization-strict: {len(lines)} quantized layer(s) would not run a "
                         f"native low-bit kernel on this backend:\n  " + "\n  ".join(lines))


def audit_report(audits: Iterable[LayerAudit], backend: str,
                 bench: dict[str, Any] | None = None) -> dict[str, Any]:
    """The audit as JSON (`ascend-llm inspect --json`, `GET /v1/quantization`): backend, summary
    line, the strict-mode findings and every layer; with `bench` (`KernelBench.to_dict()`,
    `inspect --bench`) the measured speed per layer shape under "bench"."""
    audits = list(audits)
    report = {"backend": backend, "summary": summary_line(audits), "not_native": strict_violations(audits),
              "layers": [a.to_dict() for a in audits]}
    if bench is not None:
        report["bench"] = bench
    return report


def table(audits: Iterable[LayerAudit]) -> str:
    """A plain-text table, one row per layer."""
    rows = [("layer", "scheme", "path", "kernels", "weight layout", "bytes")]
    rows += [(a.prefix, a.scheme + (f" + {a.input_transform}" if a.input_transform else ""), a.path,
              a.kernel_names, a.layout, str(a.nbytes)) for a in audits]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
