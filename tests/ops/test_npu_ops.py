"""NPU kernels (ascend_llm/ops/npu*.py) through the emulated torch_npu vs the CPU reference kernels,
on fresh random inputs.

Tolerances, float16 unless noted (eps 2^-11 ~ 4.9e-4 relative; bfloat16 2^-8 ~ 3.9e-3):
- norms / rope / swiglu: the NPU op computes in fp32 and rounds once; the reference rounds
  the normalised value before scaling by the weight (HF order), so the two differ by up to one
  rounding of outputs of magnitude ~ 4: atol 1e-2 (fp16), 6e-2 (bf16);
- attention: fp32 softmax both sides, one fp16 rounding of outputs |o| < 3: atol 4e-3;
- int8 activation quantization: the NPU multiplies by a float16 reciprocal of the scale
  (vllm-ascend's `aclnn_input_scale_reciprocal`), the reference divides by the float32 scale, so
  values within 2^-11 * 128 = 0.06 of a rounding boundary may land one step apart: at most 1 LSB,
  on under 10 % of elements;
- quantized linear layers: those 1-LSB flips change an output by deq_scale * |w| each; bounded by
  2 % of the output range (measured: 0.25 % float16, 0.6 % bfloat16 static; dynamic exact).
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ascend_llm.layers.linear import ReplicatedLinear, RowParallelLinear
from ascend_llm.layers.rotary import RotaryEmbedding
from ascend_llm.ops import AttentionMetadata, build_op_set, cpu
from ascend_llm.ops import npu_moe as moe
from ascend_llm.ops.attention_metadata import KVCacheScales
from ascend_llm.ops.cpu_int8 import dynamic_quant_per_token_reference, quantize_per_tensor_reference
from ascend_llm.quant.w8a8 import AscendW8A8Config
from ascend_llm.quant.weight_only import WInt4Config, WInt8Config
from tests.ops.npu_emulation import npu_emulation  # noqa: F401  (fixture)
from tests.quant.w8a8_writer import w8a8_dynamic_tensors, w8a8_static_tensors, w8a16_tensors

ATOL = {torch.float16: 1e-2, torch.bfloat16: 6e-2}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float16, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen(seed)) * scale).to(dtype)


@pytest.fixture
def npu_ops(npu_emulation):
    return build_op_set("npu")


# --------------------------------------------------------------------------------- element-wise

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 7, 17])
def test_rms_norm_and_add_rms_norm_match_reference(npu_ops, npu_emulation, dtype, num_tokens):
    x, res = randn(num_tokens, 96, seed=1, dtype=dtype), randn(num_tokens, 96, seed=2, dtype=dtype)
    w = (torch.rand(96, generator=gen(3)) + 0.5).to(dtype)
    assert npu_ops.select("rms_norm").name == "npu.rms_norm"
    got = npu_ops.get("rms_norm")(x, w, 1e-6)
    torch.testing.assert_close(got.float(), cpu.rms_norm(x, w, 1e-6).float(), atol=ATOL[dtype], rtol=0)
    normed, summed = npu_ops.get("add_rms_norm")(x, res, w, 1e-6)
    ref_normed, ref_summed = cpu.add_rms_norm(x, res, w, 1e-6)
    torch.testing.assert_close(normed.float(), ref_normed.float(), atol=ATOL[dtype], rtol=0)
    assert torch.equal(summed, ref_summed)          # one rounding of an exact fp32 sum, both sides
    assert {c.name for c in npu_emulation.calls} == {"npu_rms_norm", "npu_add_rms_norm"}


@pytest.mark.parametrize("num_tokens", [1, 13])
def test_rope_matches_reference(npu_ops, num_tokens):
    rotary = RotaryEmbedding(32, 256, {"rope_theta": 10000.0, "rope_type": "default"})
    positions = torch.randint(0, 256, (num_tokens,), generator=gen(4))
    cos, sin = rotary(positions)
    q, k = randn(num_tokens, 4, 32, seed=5), randn(num_tokens, 2, 32, seed=6)
    got_q, got_k = npu_ops.get("rope")(q, k, cos, sin)
    ref_q, ref_k = cpu.rope(q, k, cos, sin)
    # cos/sin are rounded to fp16 for npu_rotary_mul (r1/r2 must match x): |x| < 5 -> atol 1e-2
    torch.testing.assert_close(got_q.float(), ref_q.float(), atol=1e-2, rtol=0)
    torch.testing.assert_close(got_k.float(), ref_k.float(), atol=1e-2, rtol=0)


def test_silu_and_mul_matches_reference(npu_ops):
    x = randn(9, 2 * 48, seed=7)
    torch.testing.assert_close(npu_ops.get("silu_and_mul")(x).float(), cpu.silu_and_mul(x.clone()).float(),
                               atol=1e-2, rtol=0)


# ------------------------------------------------------------------------------------ attention

def _mixed_batch(block_size: int = 4) -> tuple[AttentionMetadata, list[int]]:
    """A prefill (5 new of 5), a decode (1 new of 9) and a chunked prefill (3 new of 12)."""
    query_lens, context_lens = [5, 1, 3], [5, 9, 12]
    tables = [[7, 2], [0, 5, 9], [3, 8, 1]]
    slots = [tables[s][p // block_size] * block_size + p % block_size
             for s, (q, c) in enumerate(zip(query_lens, context_lens)) for p in range(c - q, c)]
    meta = AttentionMetadata.build(query_lens, context_lens, tables, slots, block_size, 10, torch.device("cpu"))
    return meta, slots


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 2), (4, 4)])
def test_paged_attention_mixed_batch_matches_reference(npu_ops, npu_emulation, num_heads, num_kv_heads):
    meta, _ = _mixed_batch()
    head_dim, num_tokens = 16, 9
    k_cache = randn(11, 4, num_kv_heads, head_dim, seed=8)        # 10 blocks + the null block
    v_cache = randn(11, 4, num_kv_heads, head_dim, seed=9)
    key, value = randn(num_tokens, num_kv_heads, head_dim, seed=10), randn(num_tokens, num_kv_heads, head_dim, seed=11)
    query = randn(num_tokens, num_heads, head_dim, seed=12)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    cpu.reshape_and_cache(key, value, ref_k, ref_v, meta.slot_mapping)
    npu_ops.get("reshape_and_cache")(key, value, k_cache, v_cache, meta.slot_mapping)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
    got = npu_ops.get("paged_attention")(query, k_cache, v_cache, meta, head_dim ** -0.5)
    ref = cpu.paged_attention(query, ref_k, ref_v, meta, head_dim ** -0.5)
    torch.testing.assert_close(got.float(), ref.float(), atol=4e-3, rtol=0)
    (call,) = npu_emulation.called("npu_fused_infer_attention_score")
    assert call.args["block_table"].startswith("int32")


def test_decode_only_batch_matches_reference(npu_ops):
    query_lens, context_lens, tables = [1, 1], [6, 3], [[1, 4], [2]]
    slots = [tables[0][1] * 4 + 1, tables[1][0] * 4 + 2]
    meta = AttentionMetadata.build(query_lens, context_lens, tables, slots, 4, 5, torch.device("cpu"))
    k_cache, v_cache = randn(6, 4, 2, 8, seed=13), randn(6, 4, 2, 8, seed=14)
    query = randn(2, 4, 8, seed=15)
    got = npu_ops.get("paged_attention")(query, k_cache, v_cache, meta, 0.3)
    torch.testing.assert_close(got.float(), cpu.paged_attention(query, k_cache, v_cache, meta, 0.3).float(),
                               atol=4e-3, rtol=0)


# ------------------------------------------------------------------------- int8 activations

def test_quantize_per_tensor_within_one_step_of_reference(npu_ops):
    x = randn(17, 130, seed=16, scale=3.0)
    scale, offset = torch.tensor(0.05), torch.tensor(-7.0)
    got = npu_ops.get("quantize_per_tensor")(x, scale, offset)
    ref = quantize_per_tensor_reference(x, scale, offset)
    diff = (got.int() - ref.int()).abs()
    assert got.dtype == torch.int8 and int(diff.max()) <= 1
    assert float((diff > 0).float().mean()) < 0.1


def test_dynamic_quant_per_token_matches_reference(npu_ops):
    x = randn(7, 64, seed=17, scale=2.0)
    q, s = npu_ops.get("dynamic_quant_per_token")(x)
    ref_q, ref_s = dynamic_quant_per_token_reference(x)
    torch.testing.assert_close(s, ref_s, rtol=1e-6, atol=0)
    assert int((q.int() - ref_q.int()).abs().max()) <= 1


# ---------------------------------------------------------------------- quantized linear layers

def _ascend_layer(quant_type: str, tensors: dict[str, torch.Tensor], k: int, n: int, dtype: torch.dtype,
                  ops, bias: torch.Tensor | None = None, cls=ReplicatedLinear, **kw):
    config = AscendW8A8Config({"model_quant_type": quant_type, "x.weight": quant_type})
    layer = cls(k, n, bias=bias is not None, params_dtype=dtype, quant_config=config, prefix="x", ops=ops, **kw)
    for name, t in tensors.items():
        param = getattr(layer, name)
        param.weight_loader(param, t)
    if bias is not None:
        layer.bias.weight_loader(layer.bias, bias.to(dtype))
    layer.quant_method.process_weights_after_loading(layer)
    return layer


def _tensors(quant_type: str, w: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    if quant_type == "W8A8":
        return w8a8_static_tensors(w, None, -2.5, 3.0, deq_as_int64=dtype != torch.bfloat16)
    return w8a8_dynamic_tensors(w) if quant_type == "W8A8_DYNAMIC" else w8a16_tensors(w)


def _assert_close_to_range(got: torch.Tensor, ref: torch.Tensor, frac: float = 0.02) -> None:
    bound = frac * float(ref.float().abs().max())
    assert float((got.float() - ref.float()).abs().max()) <= bound


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("quant_type", ["W8A8", "W8A8_DYNAMIC", "W8A16"])
@pytest.mark.parametrize("num_tokens", [1, 7])
def test_ascend_linear_matches_cpu_layer(npu_emulation, quant_type, dtype, num_tokens):
    k, n = 96, 80
    w = torch.randn(n, k, generator=gen(18)) * 0.1
    bias = None if quant_type == "W8A8" else torch.randn(n, generator=gen(19)) * 0.1
    npu_layer = _ascend_layer(quant_type, _tensors(quant_type, w, dtype), k, n, dtype, build_op_set("npu"), bias)
    cpu_layer = _ascend_layer(quant_type, _tensors(quant_type, w, dtype), k, n, dtype, build_op_set("cpu"), bias)
    x = (torch.rand(num_tokens, k, generator=gen(20)) * 5.5 - 2.5).to(dtype)
    got, ref = npu_layer(x), cpu_layer(x)
    assert got.dtype == dtype and got.shape == (num_tokens, n)
    _assert_close_to_range(got, ref)
    assert npu_layer.weight.shape == (k, n)                                    # transposed to [k, n]
    assert npu_emulation.get_npu_format(npu_layer.weight) == 29                # FRACTAL_NZ
    call = npu_emulation.called("npu_weight_quant_batchmatmul" if quant_type == "W8A16" else "npu_quant_matmul")[-1]
    assert call.args["weight" if quant_type == "W8A16" else "x2"].endswith(":NZ")


def test_static_deq_scale_is_int64_for_float16_and_float32_for_bfloat16(npu_emulation):
    w = torch.randn(32, 48, generator=gen(21)) * 0.1
    for dtype, expect in ((torch.float16, "int64"), (torch.bfloat16, "float32")):
        _ascend_layer("W8A8", _tensors("W8A8", w, dtype), 48, 32, dtype, build_op_set("npu"))(
            torch.randn(3, 48, generator=gen(22)).to(dtype))
        assert npu_emulation.called("npu_quant_matmul")[-1].args["scale"].startswith(expect)
    quantize = npu_emulation.called("npu_quantize")[-1]
    assert quantize.args["scales"] == "bfloat16[48]:ND"              # the reciprocal, repeated to k


def test_quant_bias_only_on_tensor_parallel_rank_zero(npu_emulation):
    k, n = 64, 32
    w = torch.randn(n, k, generator=gen(23)) * 0.1
    x = torch.randn(5, k // 2, generator=gen(24)).half()
    for rank in (0, 1):
        tensors = _tensors("W8A8", w, torch.float16)
        npu_layer = _ascend_layer("W8A8", tensors, k, n, torch.float16, build_op_set("npu"),
                                  cls=RowParallelLinear, tp_rank=rank, tp_size=2)
        cpu_layer = _ascend_layer("W8A8", tensors, k, n, torch.float16, build_op_set("cpu"),
                                  cls=RowParallelLinear, tp_rank=rank, tp_size=2)
        _assert_close_to_range(npu_layer(x), cpu_layer(x))
        bias_arg = npu_emulation.called("npu_quant_matmul")[-1].args["bias"]
        assert (bias_arg == "None") == (rank == 1)


@pytest.mark.parametrize("config,bits", [(WInt8Config(), 8), (WInt4Config(), 4)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_weight_only_matches_cpu_kernel(npu_emulation, config, bits, dtype):
    k, n = 70, 48
    layers = []
    for backend in ("npu", "cpu"):
        layer = ReplicatedLinear(k, n, bias=True, params_dtype=dtype, quant_config=config, ops=build_op_set(backend))
        layer.weight.weight_loader(layer.weight, (torch.randn(n, k, generator=gen(25)) * 0.1).to(dtype))
        layer.bias.weight_loader(layer.bias, (torch.randn(n, generator=gen(26)) * 0.1).to(dtype))
        layer.quant_method.process_weights_after_loading(layer)
        layers.append(layer)
    x = torch.randn(6, k, generator=gen(27)).to(dtype)
    got, ref = layers[0](x), layers[1](x)
    assert layers[0].weight_only_kernel.name == "npu.weight_quant_batchmatmul"
    # same integer weights and scales; only the float summation order and the fp16/bf16
    # antiquant scale differ: 1 % of the output range
    _assert_close_to_range(got, ref, 0.01)
    expect_weight = "int8[70, 48]:NZ" if bits == 8 else "int32[70, 6]:ND"
    assert npu_emulation.called("npu_weight_quant_batchmatmul")[-1].args["weight"] == expect_weight


def test_float32_activations_are_rejected_with_the_reason(npu_emulation):
    w = torch.randn(16, 32, generator=gen(28)) * 0.1
    with pytest.raises(ValueError, match="float16/bfloat16"):
        _ascend_layer("W8A8", _tensors("W8A8", w, torch.float32), 32, 16, torch.float32, build_op_set("npu"))


@pytest.mark.parametrize("per_channel", [False, True])
def test_int8_c8_kv_cache_matches_cpu_kernels(npu_ops, npu_emulation, per_channel):
    meta, _ = _mixed_batch()
    kv_heads, head_dim = 2, 16
    shape = (kv_heads, head_dim) if per_channel else (1,)
    scales = KVCacheScales(k_scale=torch.rand(*shape, generator=gen(30)) * 0.02 + 0.01,
                           v_scale=torch.rand(*shape, generator=gen(31)) * 0.02 + 0.01,
                           k_offset=torch.randint(-5, 6, (kv_heads, head_dim), generator=gen(32)).float(),
                           v_offset=torch.randint(-5, 6, (kv_heads, head_dim), generator=gen(33)).float())
    cpu_ops = build_op_set("cpu")
    k_cache = torch.randint(-100, 100, (11, 4, kv_heads, head_dim), generator=gen(34), dtype=torch.int8)
    v_cache = torch.randint(-100, 100, (11, 4, kv_heads, head_dim), generator=gen(35), dtype=torch.int8)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    key, value = randn(9, kv_heads, head_dim, seed=36), randn(9, kv_heads, head_dim, seed=37)
    query = randn(9, 4, head_dim, seed=38)
    assert npu_ops.select("reshape_and_cache", kv_cache_dtype="int8").name == "npu.reshape_and_cache_int8"
    npu_ops.get("reshape_and_cache", kv_cache_dtype="int8")(key, value, k_cache, v_cache, meta.slot_mapping, scales)
    cpu_ops.get("reshape_and_cache", kv_cache_dtype="int8")(key, value, ref_k, ref_v, meta.slot_mapping, scales)
    # both divide in fp32 (npu_quantize div_mode): identical int8 rows
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
    got = npu_ops.get("paged_attention", kv_cache_dtype="int8")(query, k_cache, v_cache, meta, 0.25, scales)
    ref = cpu_ops.get("paged_attention", kv_cache_dtype="int8")(query, ref_k, ref_v, meta, 0.25, scales)
    # the NPU dequantizes with float16 scales/offsets (antiquant in the query dtype), the reference
    # in fp32; one fp16 rounding of outputs |o| < 1 (measured 1e-3): atol 4e-3 as for float KV
    torch.testing.assert_close(got.float(), ref.float(), atol=4e-3, rtol=0)
    assert npu_emulation.called("npu_fused_infer_attention_score")[-1].args["key"].startswith("int8")


def test_grouped_matmul_matches_per_expert_reference(npu_ops, npu_emulation):
    # MoE has no CPU op yet: the reference is the per-expert matmul loop, in fp32
    counts = [3, 0, 5, 1]                                   # rows per expert (one expert idle)
    x = randn(sum(counts), 32, seed=40)
    w_ckpt = randn(4, 24, 32, seed=41, scale=0.2)           # [E, n, k] checkpoint layout
    weight = moe.prepare_expert_weights(w_ckpt)             # [E, k, n]
    group_list = torch.tensor(counts).cumsum(0)
    got = npu_ops.get("grouped_matmul")(x, weight, group_list)
    ref, start = [], 0
    for e, count in enumerate(counts):
        ref.append(x[start:start + count].float() @ w_ckpt[e].float().T)
        start += count
    torch.testing.assert_close(got.float(), torch.cat(ref), atol=1e-2, rtol=0)   # one fp16 rounding, |y| < 8
    assert npu_emulation.called("npu_grouped_matmul")[-1].args["group_list"] == "int64[4]:ND"


def test_importing_the_npu_backend_does_not_import_torch_npu():
    code = ("import sys, ascend_llm.ops.npu, ascend_llm.graph; from ascend_llm.ops import build_registry; "
            "build_registry(('cpu',)); assert 'torch_npu' not in sys.modules; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "ok", result.stderr


def test_add_rms_norm_quant_matches_norm_then_quantize(npu_ops):
    # no CPU op fuses these: the reference is cpu.add_rms_norm then the int8 reference quantize.
    # The fused op quantizes the fp32 normed value, the reference its float16 rounding: values
    # within 2^-11 * 128 of a rounding boundary may differ by one step
    x, res = randn(11, 96, seed=42), randn(11, 96, seed=43)
    w = (torch.rand(96, generator=gen(44)) + 0.5).half()
    scale, offset = torch.tensor(0.03), torch.tensor(4.0)
    q, summed = npu_ops.get("add_rms_norm_quant")(x, res, w, 1e-6, scale, offset)
    normed, ref_summed = cpu.add_rms_norm(x, res, w, 1e-6)
    ref_q = quantize_per_tensor_reference(normed, scale, offset)
    diff = (q.int() - ref_q.int()).abs()
    assert q.dtype == torch.int8 and int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.1
    assert torch.equal(summed, ref_summed)


def test_a_kernel_that_skipped_the_nz_cast_is_caught(npu_emulation, monkeypatch):
    from ascend_llm.ops import npu_linear
    from tests.ops.npu_emulation import NPUArgumentError
    monkeypatch.setattr(npu_linear, "to_nz", lambda w: w.contiguous())       # a prepare without the cast
    w = torch.randn(16, 32, generator=gen(45)) * 0.1
    layer = _ascend_layer("W8A8", _tensors("W8A8", w, torch.float16), 32, 16, torch.float16, build_op_set("npu"))
    with pytest.raises(NPUArgumentError, match="FRACTAL_NZ"):
        layer(torch.randn(2, 32, generator=gen(46)).half())
