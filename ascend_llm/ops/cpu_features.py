"""What the host CPU can run, probed once per process; every CPU kernel that needs a CPU feature
asks here in its `supports()` and steps aside with the reason this module gives.

The first such dependency: oneDNN's low-precision linear (`torch.ops.mkldnn.
_reorder_linear_weight` / `_linear_pointwise`, ops/cpu_onednn.py). torch runs it in bfloat16 only
with AVX-512 BW + VL + DQ or AVX-NE-CONVERT (float16: AVX512-FP16 or AVX-NE-CONVERT); on an
AVX2-only x86-64 CPU (AMD Zen 1-3, Intel client cores without AVX-512) it raises
"mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert or avx512bw, avx512vl
and avx512dq" (or "could not create a primitive descriptor" for an unpacked weight). F.linear then
runs (ops/cpu_bf16.py): it also accumulates bf16 products in fp32 and rounds once, so the
outputs agree within one bf16 rounding. Float32 oneDNN needs only SSE4.1.
The second: the int8 GEMM of `quant_matmul` (ops/cpu_int8_gemm.py, torch._int_mm through oneDNN)
is exact only with VNNI or AMX-INT8 (`int8_dot_unavailable`); without, oneDNN sums u8 x s8 pairs in
saturating int16 and the result is wrong, so the kernel also probes torch._int_mm itself once.
The C++ kernels (ops/cpu_extension.py) are float32 only and built on the host itself with
`-march=native`, AVX2/FMA intrinsics behind `#ifdef __AVX2__` and a scalar path otherwise, so
they need no feature check.

The decision takes two sources, and both must agree:
- the x86 feature flags of /proc/cpuinfo, mirroring torch's own rule, capped by
  `ASCEND_LLM_CPU_ISA` (in the spirit of oneDNN's ONEDNN_MAX_CPU_ISA and torch's
  ATEN_CPU_CAPABILITY): `native` (default), `avx512_core` (AVX-512 without BF16 / FP16 / AMX /
  VNNI: Skylake-SP) or `avx2` (no AVX-512, AMX, AVX-VNNI, AVX-NE-CONVERT: AMD Zen 3). The cap makes
  our kernels behave as on such a host; torch's own kernels follow it only through
  ONEDNN_MAX_CPU_ISA / ATEN_CPU_CAPABILITY, set before the process starts;
- torch's own check (`torch.ops.mkldnn._is_mkldnn_bf16_supported()`; for int8, the kernel's probe
  of torch._int_mm), which also honours ONEDNN_MAX_CPU_ISA: `ONEDNN_MAX_CPU_ISA=AVX2` reproduces
  an AVX2-only host in full.
"""
from __future__ import annotations

import functools
import logging
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ascend_llm.platform import env_choice

logger = logging.getLogger(__name__)

ENV_VAR = "ASCEND_LLM_CPU_ISA"
ISA_LEVELS = ("native", "avx512_core", "avx2")
X86_MACHINES = ("x86_64", "amd64", "i386", "i686")
# flag prefixes an ISA cap removes (Linux /proc/cpuinfo names)
_REMOVED_BY_CAP = {
    "native": (),
    "avx512_core": ("avx512_bf16", "avx512_fp16", "amx", "avx_ne_convert", "avx_vnni", "avx512_vnni"),
    "avx2": ("avx512", "amx", "avx_"),          # avx_vnni, avx_ne_convert, avx_ifma, avx_vnni_int8
}
# torch's rule (aten/src/ATen/native/mkldnn/Utils.h): any one of these sets suffices on x86
_ONEDNN_NEEDS = {
    torch.bfloat16: (frozenset({"avx512bw", "avx512vl", "avx512dq"}), frozenset({"avx_ne_convert"})),
    torch.float16: (frozenset({"avx512_fp16"}), frozenset({"avx_ne_convert"})),
}
# an exact int8 x int8 -> int32 dot product (vpdpbusd, or AMX tiles); any one suffices
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@dataclass(frozen=True, slots=True)
class CpuFeatures:
    """The host CPU as the kernels see it (after the ASCEND_LLM_CPU_ISA cap)."""
    machine: str                  # platform.machine(), lower case: x86_64, aarch64, ...
    vendor: str                   # GenuineIntel, AuthenticAMD, or "" if unknown
    flags: frozenset[str] = field(repr=False)   # x86 feature flags after the cap; empty if unknown
    isa: str                      # the cap in force (one of ISA_LEVELS)
    torch_bf16: bool              # torch's own oneDNN bf16 check (honours ONEDNN_MAX_CPU_ISA)
    torch_fp16: bool
    onednn_max_isa: str = ""      # the ONEDNN_MAX_CPU_ISA setting, named in reasons

    def onednn_unavailable(self, dtype: torch.dtype | None) -> str | None:
        """Why oneDNN's linear cannot run in `dtype` on this CPU, or None if it can."""
        if dtype == torch.float32:
            return None
        needs = _ONEDNN_NEEDS.get(dtype)
        if needs is None:
            return f"dtype {dtype} has no oneDNN linear here"
        wanted = " or ".join("+".join(sorted(group)) for group in needs)
        if self.flags_decide() and not any(group <= self.flags for group in needs):
            cap = "" if self.isa == "native" else f" ({ENV_VAR}={self.isa})"
            return f"oneDNN {_dtype_name(dtype)} linear needs the CPU features {wanted}; this CPU{cap} lacks them"
        if not (self.torch_bf16 if dtype == torch.bfloat16 else self.torch_fp16):
            hint = f" (ONEDNN_MAX_CPU_ISA={self.onednn_max_isa})" if self.onednn_max_isa else ""
            return f"torch reports no oneDNN {_dtype_name(dtype)} support on this CPU{hint}; it needs {wanted}"
        return None

    def int8_dot_unavailable(self) -> str | None:
        """Why this CPU has no exact int8 dot-product instruction (VNNI / AMX), or None if it has
        one. Without one oneDNN's int8 GEMM sums u8 x s8 pairs in saturating int16 (vpmaddubsw)
        and is not exact; only the x86 flags decide here (elsewhere the kernel's own probe does)."""
        if not self.flags_decide() or any(flag in self.flags for flag in INT8_DOT_FLAGS):
            return None
        cap = "" if self.isa == "native" else f" ({ENV_VAR}={self.isa})"
        return (f"an exact int8 GEMM needs one of the CPU features {' / '.join(INT8_DOT_FLAGS)}; "
                f"this CPU{cap} lacks them")

    def flags_decide(self) -> bool:
        """Whether the x86 flags rule applies: on x86 with known flags, or under a cap (which
        makes any host behave as the capped x86 one)."""
        return self.isa != "native" or (self.machine in X86_MACHINES and bool(self.flags))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def isa_cap() -> str:
    """The ASCEND_LLM_CPU_ISA setting (native when unset); ValueError naming a bad value."""
    return env_choice(ENV_VAR, ISA_LEVELS, "native")


def cpu_features() -> CpuFeatures:
    """The probe (cached per ASCEND_LLM_CPU_ISA value, so a test may change the variable)."""
    return _probe(isa_cap())


@functools.lru_cache(maxsize=len(ISA_LEVELS))
def _probe(isa: str) -> CpuFeatures:
    text = cpuinfo_text()
    features = CpuFeatures(machine=platform.machine().lower(), vendor=parse_cpuinfo_field(text, "vendor_id"),
                           flags=cap_flags(parse_cpu_flags(text), isa), isa=isa,
                           torch_bf16=_torch_check("_is_mkldnn_bf16_supported"),
                           torch_fp16=_torch_check("_is_mkldnn_fp16_supported"),
                           onednn_max_isa=os.environ.get("ONEDNN_MAX_CPU_ISA", ""))
    logger.debug("CPU: %s %s, %s=%s; %s", features.vendor or "unknown vendor", features.machine, ENV_VAR,
                 isa, features.onednn_unavailable(torch.bfloat16) or "oneDNN bfloat16 linear available")
    return features


@functools.lru_cache(maxsize=1)
def cpuinfo_text() -> str:
    """/proc/cpuinfo, read once ("" where there is none: not Linux)."""
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def parse_cpuinfo_field(text: str, key: str) -> str:
    """The first `key : value` of a /proc/cpuinfo text (e.g. vendor_id), or ""."""
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() == key:
            return value.strip()
    return ""


def parse_cpu_flags(text: str) -> frozenset[str]:
    """The x86 `flags` of the first processor in a /proc/cpuinfo text (empty if none)."""
    return frozenset(parse_cpuinfo_field(text, "flags").lower().split())


def cap_flags(flags: frozenset[str], isa: str) -> frozenset[str]:
    """`flags` without those an `isa` cap (ISA_LEVELS) rules out."""
    return frozenset(f for f in flags if not f.startswith(_REMOVED_BY_CAP[isa]))


def _torch_check(name: str) -> bool:
    """torch.ops.mkldnn.<name>() (False when oneDNN or the check is missing from this build)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(getattr(torch.ops.mkldnn, name)())
    except (AttributeError, RuntimeError):
        return False


@functools.lru_cache(maxsize=None)
def log_step_aside(kernel: str, reason: str, instead: str) -> None:
    """Log once per process (the cache is the "once") that `kernel` steps aside, why, and what runs."""
    logger.info("%s steps aside: %s; %s runs instead", kernel, reason, instead)
