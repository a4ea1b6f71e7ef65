"""Which float linear kernel suits this CPU: our GEMV (ops/cpu_gemv.py, when it builds), MKL's
GEMM/GEMV (F.linear) or oneDNN's.

`auto` (the default) takes our GEMV wherever its C++ extension builds except on Intel CPUs,
where MKL's GEMV is faster (2-vCPU Xeon, 2026-12-05: 20.9 vs 23.7 ms over SmolLM2's matrices at
one row); for the rest the vendor rule below decides (and also picks the GEMM behind the GEMV's
batches of more than 4 rows).

Measured on the two machine kinds this project runs on (benchmarks/results/NOTES_cpu.md):
- AMD EPYC (2 vCPUs): MKL takes its generic code path; oneDNN's packed two-row GEMV streams
  weights ~2x faster (25 vs 12 GB/s), and its packed GEMM is 2-3x faster on batches.
- Intel Xeon (2 vCPUs): MKL's one-row GEMV is ~20% faster than oneDNN at decode (14.5 vs
  18.2 ms for SmolLM2's 30 layers), oneDNN's packed GEMM is 5-20% faster at 4-32 rows.
Decode at small batch is what users wait on, so oneDNN is used unless the CPU is an Intel
one. `ASCEND_LLM_CPU_LINEAR=gemv|onednn|mkl` overrides the choice.

The choice is by vendor, not by a start-up micro-benchmark: timings taken while other
processes load the CPU are off by 10x (OpenMP threads spin), which would make the kernel,
and so the exact fp32 outputs, depend on the load at start-up.
"""
from __future__ import annotations

import functools

from ascend_llm.ops.cpu_features import cpuinfo_text, parse_cpuinfo_field
from ascend_llm.platform import env_choice

ENV_VAR = "ASCEND_LLM_CPU_LINEAR"
_CHOICES = ("auto", "gemv", "onednn", "mkl")


def linear_choice() -> str:
    """The ASCEND_LLM_CPU_LINEAR setting (auto when unset); ValueError naming a bad value."""
    return env_choice(ENV_VAR, _CHOICES, "auto")


def onednn_preferred() -> bool:
    """True when float linear layers that our GEMV does not take should run on oneDNN (the env
    override, else by vendor)."""
    choice = linear_choice()
    if choice in ("onednn", "mkl"):
        return choice == "onednn"
    return cpu_vendor() != "GenuineIntel"


@functools.lru_cache(maxsize=1)
def cpu_vendor() -> str:
    """The `vendor_id` of /proc/cpuinfo (e.g. GenuineIntel, AuthenticAMD), or "" if unknown."""
    return parse_cpuinfo_field(cpuinfo_text(), "vendor_id")
