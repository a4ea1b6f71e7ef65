"""MoE grouped matmul: the CPU reference vs a naive per-row loop, its errors, its cost (only
experts with rows are visited), and the NPU kernel (emulated torch_npu) vs the CPU reference."""
from __future__ import annotations

import pytest
import torch

from ascend_llm.ops import build_op_set, cpu_moe
from ascend_llm.ops import npu_moe
from tests.ops.npu_emulation import npu_emulation  # noqa: F401  (fixture)


def _naive(x: torch.Tensor, weight: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Row by row: the expert of row r is the one whose range holds r (fp64)."""
    out = torch.zeros(x.shape[0], weight.shape[2], dtype=torch.float64)
    owner = [e for e, c in enumerate(counts) for _ in range(c)]
    for r, e in enumerate(owner):
        out[r] = x[r].double() @ weight[e].double()
    return out


@pytest.mark.parametrize("counts", [[4, 0, 7, 1, 0, 3], [0, 0, 0, 9, 0, 0], [1] * 6, [0] * 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_reference_matches_naive_loop(counts, dtype):
    gen = torch.Generator().manual_seed(sum(counts) + len(counts))
    x = torch.randn(sum(counts) + 1, 24, generator=gen).to(dtype)      # one row past the groups
    w = (torch.randn(len(counts), 24, 40, generator=gen) * 0.3).to(dtype)
    got = cpu_moe.grouped_matmul(x, w, torch.tensor(counts).cumsum(0))
    assert got.dtype == dtype and got.shape == (x.shape[0], 40)
    tol = 1e-5 if dtype == torch.float32 else 2e-2      # bf16: one output rounding, |y| < 4
    torch.testing.assert_close(got.double(), _naive(x, w, counts), atol=tol, rtol=tol)
    assert bool((got[sum(counts):] == 0).all())


def test_only_experts_with_rows_are_visited():
    counts = [0] * 60 + [2] + [0] * 60 + [1] + [0] * 6
    x, w = torch.randn(3, 8), torch.randn(len(counts), 8, 8)
    visited = []
    cpu_moe.grouped_apply(x, torch.tensor(counts).cumsum(0), 8,
                          lambda e, rows: visited.append((e, rows.shape[0])) or rows @ w[e])
    assert visited == [(60, 2), (121, 1)]


def test_registered_as_the_cpu_op():
    assert build_op_set("cpu").select("grouped_matmul").name == "cpu.grouped_matmul"


@pytest.mark.parametrize("x_shape,w_shape,group_list,match", [
    ((5, 8), (3, 9, 4), [1, 2, 5], "weight \\[E, k, n\\]"),
    ((5, 8), (3, 8, 4), [1, 2], "group_list: expected shape \\[3\\]"),
    ((5, 8), (3, 8, 4), [1, 2, 6], "exceeds x's 5 rows"),
    ((5, 8), (3, 8, 4), [3, 2, 5], "non-decreasing"),
])
def test_bad_inputs_raise_clear_errors(x_shape, w_shape, group_list, match):
    with pytest.raises(ValueError, match=match):
        cpu_moe.grouped_matmul(torch.randn(*x_shape), torch.randn(*w_shape), torch.tensor(group_list))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_npu_kernel_matches_cpu_reference(npu_emulation, dtype):   # noqa: F811
    counts = [2, 0, 6, 1, 0]
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(sum(counts), 32, generator=gen).to(dtype)
    w_ckpt = (torch.randn(5, 24, 32, generator=gen) * 0.2).to(dtype)   # [E, n, k] checkpoint layout
    weight = npu_moe.prepare_expert_weights(w_ckpt)                     # [E, k, n]
    group_list = torch.tensor(counts).cumsum(0)
    got = build_op_set("npu").get("grouped_matmul")(x, weight, group_list)
    want = cpu_moe.grouped_matmul(x, weight, group_list)
    # both accumulate in fp32 and round once to fp16 / bf16 (|y| < 4)
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2 if dtype == torch.bfloat16 else 4e-3, rtol=0)
    assert npu_emulation.called("npu_grouped_matmul")


def test_fused_moe_layer_binds_the_npu_kernel(npu_emulation):   # noqa: F811
    """A float FusedMoE layer built on the npu op set runs npu_grouped_matmul (emulated) and
    matches the same layer on the CPU ops."""
    from ascend_llm.layers.moe import FusedMoE
    from ascend_llm.layers.moe_routing import RoutingConfig

    gen = torch.Generator().manual_seed(6)
    w13 = (torch.randn(4, 48, 32, generator=gen) * 0.2).to(torch.bfloat16)   # gate | up, [E, 2I, H]
    w2 = (torch.randn(4, 32, 24, generator=gen) * 0.2).to(torch.bfloat16)    # [E, H, I]

    def layer(backend: str) -> FusedMoE:
        moe = FusedMoE(4, 32, 24, RoutingConfig(2), torch.bfloat16, None, "model.layers.1.mlp.experts",
                       build_op_set(backend))
        for e in range(4):
            moe.load_checkpoint_tensor(f"{moe.prefix}.{e}.gate_proj.weight", w13[e, :24])
            moe.load_checkpoint_tensor(f"{moe.prefix}.{e}.up_proj.weight", w13[e, 24:])
            moe.load_checkpoint_tensor(f"{moe.prefix}.{e}.down_proj.weight", w2[e])
        moe.quant_method.process_weights_after_loading(moe)
        return moe

    x = torch.randn(7, 32, generator=gen).to(torch.bfloat16)
    logits = torch.randn(7, 4, generator=gen)
    got, want = layer("npu")(x, logits), layer("cpu")(x, logits)
    assert len(npu_emulation.called("npu_grouped_matmul")) == 2
    # bf16 intermediate rounding on both sides, different op implementations (|y| < 1)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
