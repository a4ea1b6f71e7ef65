"""The emulated torch_npu itself: its semantics on hand-checkable inputs, and the argument
checks that catch a wrong call (dtype, format, 310P restriction) before numbers are compared."""
from __future__ import annotations

import pytest
import torch

from ascend_llm.ops import build_op_set
from ascend_llm.platform import npu_available, resolve_device, torch_device
from tests.ops.npu_emulation import (ACL_FORMAT_FRACTAL_NZ, NPUArgumentError, install_fake_torch_npu,
                                     npu_emulation)  # noqa: F401  (fixture)


def int8(*rows: list[int]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int8)


def test_platform_sees_the_emulated_device(npu_emulation):
    assert npu_available() and resolve_device("auto") == "npu"
    assert torch_device("npu") == torch.device("cpu")       # the emulation keeps tensors on the CPU


def test_quant_matmul_semantics_int64_scale_and_int32_bias(npu_emulation):
    x1 = int8([1, 2, 3], [-4, 5, -6])                                     # [2, 3]
    w = npu_emulation.npu_format_cast(int8([1, 0], [0, 1], [1, 1]), ACL_FORMAT_FRACTAL_NZ)   # [3, 2]
    scale = torch.tensor([0.5, 0.25]).view(torch.int32).to(torch.int64)   # float32 bits in int64
    out = npu_emulation.npu_quant_matmul(x1, w, scale, bias=torch.tensor([1, -1], dtype=torch.int32),
                                         output_dtype=torch.float16)
    # x1 @ w = [[4, 5], [-10, -1]]; + bias = [[5, 4], [-9, -2]]; * scale
    assert out.tolist() == [[2.5, 1.0], [-4.5, -0.5]]


def test_int4_pack_round_trips_through_weight_quant_batchmatmul(npu_emulation):
    w = torch.randint(-8, 8, (16, 8), generator=torch.Generator().manual_seed(0), dtype=torch.int32)   # [k, n]
    packed = npu_emulation.npu_convert_weight_to_int4pack(w)
    assert packed.shape == (16, 1) and packed.dtype == torch.int32
    eye = torch.eye(16, dtype=torch.float16)
    out = npu_emulation.npu_weight_quant_batchmatmul(eye, packed, torch.ones(8, dtype=torch.float16))
    assert torch.equal(out.int(), w)


def test_quant_matmul_rejects_a_weight_not_cast_to_nz(npu_emulation):
    with pytest.raises(NPUArgumentError, match="FRACTAL_NZ"):
        npu_emulation.npu_quant_matmul(int8([1, 2]), int8([1], [2]), torch.tensor([1], dtype=torch.int64),
                                       output_dtype=torch.float16)


@pytest.mark.parametrize("scale,pertoken,out_dtype,match", [
    (torch.ones(2, dtype=torch.float16), None, torch.float16, "scale dtype torch.float16"),
    (torch.ones(2), None, torch.float16, "int64"),
    (torch.ones(2, dtype=torch.int64), None, torch.bfloat16, "not int64"),
    (torch.ones(2), torch.ones(1, dtype=torch.float16), torch.bfloat16, "pertoken_scale must be float32"),
])
def test_quant_matmul_rejects_wrong_scale_dtypes(npu_emulation, scale, pertoken, out_dtype, match):
    w = npu_emulation.npu_format_cast(int8([1, 2], [3, 4]), ACL_FORMAT_FRACTAL_NZ)
    with pytest.raises(NPUArgumentError, match=match):
        npu_emulation.npu_quant_matmul(int8([1, 2]), w, scale, pertoken_scale=pertoken, output_dtype=out_dtype)


def test_quantize_rejects_scales_in_another_dtype(npu_emulation):
    x = torch.randn(2, 4).half()
    with pytest.raises(NPUArgumentError, match="scales in the input dtype"):
        npu_emulation.npu_quantize(x, torch.ones(4), torch.zeros(4), torch.qint8, -1, False)


def test_reshape_and_cache_rejects_int64_slots(npu_emulation):
    cache = torch.zeros(2, 4, 1, 8, dtype=torch.float16)
    key = torch.randn(1, 1, 8).half()
    with pytest.raises(NPUArgumentError, match="int32"):
        npu_emulation._npu_reshape_and_cache(key, key, cache, cache.clone(), torch.tensor([3]))


def test_attention_rejects_a_wrong_causal_mask(npu_emulation):
    q = torch.randn(2, 2, 8).half()
    kv = torch.randn(2, 4, 16).half()
    with pytest.raises(NPUArgumentError, match="upper triangle"):
        npu_emulation.npu_fused_infer_attention_score(
            q, kv, kv, atten_mask=torch.zeros(2048, 2048, dtype=torch.bool), actual_seq_lengths=[2],
            actual_seq_lengths_kv=[2], block_table=torch.tensor([[0]], dtype=torch.int32), num_heads=2,
            num_key_value_heads=2, input_layout="TND", sparse_mode=3, block_size=4)


def test_310p_restrictions_are_named_when_selecting_kernels(monkeypatch):
    install_fake_torch_npu(monkeypatch, soc="Ascend310P3")
    ops = build_op_set("npu")
    with pytest.raises(ValueError, match="310P.*pertoken_scale"):
        ops.select("w8a8_linear", scheme="dynamic", dtype=torch.float16)
    with pytest.raises(ValueError, match="310P.*bfloat16"):
        ops.select("w8a8_linear", scheme="static", dtype=torch.bfloat16)
    assert ops.select("w8a8_linear", scheme="static", dtype=torch.float16).name == "npu.w8a8_static"


def test_npu_graph_replays_captured_ops_on_new_input_values(npu_emulation):
    a, b = torch.randn(3, 4), torch.randn(4, 2)
    graph = torch.npu.NPUGraph()
    with torch.npu.graph(graph):
        out = torch.relu(a @ b) + 1.0
    a.copy_(torch.randn(3, 4))
    graph.replay()
    assert torch.equal(out, torch.relu(a @ b) + 1.0)
    assert graph.num_replays == 1
