"""The CPU int8 GEMM of `quant_matmul` (ops/cpu_int8_gemm.py) against the float64 reference
(ops/cpu_int8.py): the int32 accumulator bit for bit, the static and per-token outputs bit for bit
(both share the epilogue), and the step-aside to the reference, with its reason in the audit, where
the CPU (or a cap: ASCEND_LLM_CPU_ISA, ONEDNN_MAX_CPU_ISA) has no exact int8 dot product.

Host independence: what the registry binds follows `int8_gemm_unavailable()` on any host; the tests
of the raw int32 product need the kernel to be usable here and skip, saying why, where it is not
(then the step-aside tests cover the host). The inputs are fresh random ones each run (the seed is
in the failure message), plus the worst cases -128 / 127.
"""
from __future__ import annotations

import random

import pytest
import torch

from ascend_llm.ops import build_op_set, build_registry, cpu_int8, cpu_int8_gemm
from ascend_llm.ops.cpu_features import cpu_features
from ascend_llm.quant.audit import audit_model, strict_violations
from tests.quant.peer_fixtures import build

REFERENCE = "cpu.quant_matmul"


def _bound():
    return build_registry(("cpu",)).choose("quant_matmul", "cpu")


def _int8(shape: tuple[int, ...], pattern: str, generator: torch.Generator) -> torch.Tensor:
    if pattern == "random":
        return torch.randint(-128, 128, shape, dtype=torch.int8, generator=generator)
    values = {"max": 127, "min": -128}
    if pattern in values:
        return torch.full(shape, values[pattern], dtype=torch.int8)
    signs = torch.randint(0, 2, shape, generator=generator, dtype=torch.int8)   # "extremes": mixed
    return torch.where(signs.bool(), torch.tensor(127, dtype=torch.int8), torch.tensor(-128, dtype=torch.int8))


def _needs_kernel() -> None:
    reason = cpu_int8_gemm.int8_gemm_unavailable()
    if reason is not None:          # e.g. an AVX2-only CPU: test_steps_aside_* cover this host
        pytest.skip(f"the int8 GEMM steps aside here: {reason}")


def test_registry_binds_the_int8_gemm_exactly_where_it_is_exact():
    choice, reason = _bound(), cpu_int8_gemm.int8_gemm_unavailable()
    if reason is None:
        assert choice.kernel.name == cpu_int8_gemm.NAME and choice.kernel.path == "native"
        assert choice.rejected == ()
    else:
        assert choice.kernel.name == REFERENCE and choice.kernel.path == "reference"
        assert choice.rejected == (f"{cpu_int8_gemm.NAME}: {reason}",)


@pytest.mark.parametrize("k", [2, 3, 31, 576, 1536, 4096])
def test_int32_accumulator_equals_the_reference_bit_for_bit(k):
    _needs_kernel()
    seed = random.randrange(1 << 31)
    generator = torch.Generator().manual_seed(seed)
    for rows in (1, 3, 16, 33):
        for pattern in ("random", "max", "min", "extremes"):
            for n in (1, 7, 192):
                q_x = _int8((rows, k), pattern, generator)                                   # [T, k]
                weight = _int8((n, k), "min" if pattern == "extremes" else pattern, generator)  # [n, k]
                got = cpu_int8_gemm.int8_matmul(q_x, weight)                                # [T, n]
                want = cpu_int8.int8_matmul_reference(q_x, weight)
                assert got.dtype == torch.int32 and torch.equal(got, want), (seed, rows, pattern, n)


def test_row_slices_of_a_fused_weight_and_the_calls_int_mm_cannot_take():
    _needs_kernel()
    generator = torch.Generator().manual_seed(random.randrange(1 << 31))
    weight = _int8((96, 64), "random", generator)
    q_x = _int8((5, 64), "random", generator)
    for part in (weight[:32], weight[32:80]):          # a fused qkv's shard groups (W8A8 static apply)
        assert torch.equal(cpu_int8_gemm.int8_matmul(q_x, part), cpu_int8.int8_matmul_reference(q_x, part))
    # k = 1 (torch 2.13's CPU _int_mm returns garbage there) and no rows run the reference
    one = (_int8((4, 1), "random", generator), _int8((9, 1), "random", generator))
    assert torch.equal(cpu_int8_gemm.int8_matmul(*one), cpu_int8.int8_matmul_reference(*one))
    assert cpu_int8_gemm.int8_matmul(q_x[:0], weight).shape == (0, 96)
    with pytest.raises(ValueError, match="both must be int8"):
        cpu_int8_gemm.int8_matmul(q_x.float(), weight)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 16, 40])
def test_static_and_dynamic_outputs_equal_the_reference(out_dtype, rows):
    seed = random.randrange(1 << 31)
    generator = torch.Generator().manual_seed(seed)
    kernel = _bound().kernel
    k, n = 576, 192
    q_x, weight = _int8((rows, k), "random", generator), _int8((n, k), "random", generator)
    deq_scale = torch.rand(n, generator=generator) * 1e-4 + 1e-6                     # [n]
    quant_bias = torch.randint(-(1 << 30), 1 << 30, (n,), dtype=torch.int32, generator=generator)
    got = kernel.run(q_x, weight, deq_scale, quant_bias, out_dtype)                   # [T, n]
    want = cpu_int8.quant_matmul_reference(q_x, weight, deq_scale, quant_bias, out_dtype)
    # the same int32 accumulator and the same float32 epilogue: equal, not merely close
    assert got.dtype == out_dtype and torch.equal(got, want), f"seed {seed}"
    weight_scale, token_scale = torch.rand(n, generator=generator), torch.rand(rows, generator=generator)
    bias = torch.randn(n, generator=generator)
    got = kernel.run(q_x, weight, weight_scale, bias, out_dtype, pertoken_scale=token_scale)
    want = cpu_int8.dynamic_quant_matmul_reference(q_x, weight, weight_scale, token_scale, bias, out_dtype)
    assert got.dtype == out_dtype and torch.equal(got, want), f"seed {seed}"


def test_steps_aside_under_an_isa_cap_with_the_reason_in_the_audit(monkeypatch):
    monkeypatch.setenv("ASCEND_LLM_CPU_ISA", "avx2")
    reason = cpu_features().int8_dot_unavailable()
    assert reason == ("an exact int8 GEMM needs one of the CPU features avx512_vnni / avx_vnni / amx_int8; "
                      "this CPU (ASCEND_LLM_CPU_ISA=avx2) lacks them")
    _, model = build("msmodelslim/llama_w8a8", build_op_set("cpu"), torch.float32)
    audits = [a for a in audit_model(model) if a.quantized]
    assert all(a.path == "reference" for a in audits)
    matmul = next(k for k in audits[0].to_dict()["kernels"] if k["op"] == "quant_matmul")
    assert matmul == {"op": "quant_matmul", "kernel": REFERENCE, "path": "reference",
                      "rejected": [f"{cpu_int8_gemm.NAME}: {reason}"]}
    assert strict_violations(audits)[0] == ("model.layers.0.self_attn.qkv_proj [W8A8 static]: "
                                           "quant_matmul runs cpu.quant_matmul (reference)")


def test_probe_rejects_an_int_mm_that_saturates(monkeypatch):
    """What torch._int_mm does without VNNI (ONEDNN_MAX_CPU_ISA=AVX2: oneDNN's vpmaddubsw sums
    u8 x s8 pairs in saturating int16), imitated: the probe must catch it."""
    def saturating(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        pairs = (a.to(torch.int64) + 128)[:, :, None] * b.to(torch.int64)[None]      # [T, k, n]
        pairs = pairs.reshape(a.shape[0], -1, 2, b.shape[1]).sum(2).clamp(-32768, 32767)
        return (pairs.sum(1) - 128 * b.to(torch.int64).sum(0)).to(torch.int32)
    monkeypatch.setattr(torch, "_int_mm", saturating)
    cpu_int8_gemm._probe_int_mm.cache_clear()
    try:
        reason = cpu_int8_gemm._probe_int_mm()
    finally:
        monkeypatch.undo()
        cpu_int8_gemm._probe_int_mm.cache_clear()
    assert reason is not None and reason.startswith("torch._int_mm is not exact on this CPU")


def test_the_int8_gemm_is_no_reference_fallback_of_other_backends():
    for backend in ("npu", "cuda"):
        names = [k.name for k in build_registry((backend,)).kernels.get(("quant_matmul", backend), [])
                 if k.name.startswith(f"{backend}.torch_reference")]
        assert names == [f"{backend}.torch_reference.quant_matmul"]
        fallback = next(k for k in build_registry((backend,)).kernels[("quant_matmul", backend)]
                        if k.name in names)
        assert fallback.run is cpu_int8.quant_matmul        # the float64 reference, as before
