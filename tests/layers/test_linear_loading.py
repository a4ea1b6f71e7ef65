"""The one loading path of linear parameters (`LinearBase.weight_loader`): float weights, biases,
quantized tensors with their own dims (block scales, per-shard scalars, transposed layouts) all
split the same way over tensor-parallel ranks, and a checkpoint tensor of the wrong size fails
naming it instead of being truncated."""
from __future__ import annotations

import pytest
import torch

from ascend_llm.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear,
                                      ReplicatedLinear, RowParallelLinear)
from ascend_llm.quant.param_loading import add_param


def _declared(layer, name, shape, dtype, out_dim, out_block=1, in_dim=None):
    """A quantized parameter declared after construction, with the layer's loader."""
    param = add_param(layer, name, shape, dtype, out_dim=out_dim, out_block=out_block, in_dim=in_dim)
    param.weight_loader = layer.weight_loader
    return param


def test_qkv_with_replicated_kv_heads_takes_each_ranks_rows():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(rows, 3, generator=gen) for rows in (8, 4, 4))      # 4 heads, 2 KV heads
    for rank in range(4):
        layer = QKVParallelLinear(3, 2, 4, 2, bias=True, prefix="m.qkv_proj", tp_rank=rank, tp_size=4)
        for shard, full in zip("qkv", (q, k, v)):
            layer.weight.weight_loader(layer.weight, full, shard)
            layer.bias.weight_loader(layer.bias, full[:, 0].clone(), shard)
        kv = rank // 2                                   # two ranks share each KV head
        want = torch.cat([q[2 * rank:2 * rank + 2], k[2 * kv:2 * kv + 2], v[2 * kv:2 * kv + 2]])
        assert torch.equal(layer.weight.data, want) and torch.equal(layer.bias.data, want[:, 0])


def test_block_scales_and_per_shard_scalars_follow_the_fused_shards():
    """[n / 2, k / 2] block scales of gate / up (out_block 2) and one scalar per shard, TP 2."""
    gen = torch.Generator().manual_seed(1)
    blocks = [torch.randn(2, 3, generator=gen) for _ in range(2)]               # per shard: 4 rows
    for rank in range(2):
        layer = MergedColumnParallelLinear(6, [4, 4], prefix="m.gate_up_proj", tp_rank=rank, tp_size=2)
        scale = _declared(layer, "weight_scale_inv", (2, 3), torch.float32, out_dim=0, out_block=2)
        scalar = _declared(layer, "input_scale", (2,), torch.float32, out_dim=None)
        for shard, full in enumerate(blocks):
            layer.weight_loader(scale, full, shard)
            layer.weight_loader(scalar, torch.tensor([shard + 0.5]), shard)
        assert torch.equal(scale.data, torch.stack([blocks[0][rank], blocks[1][rank]]))
        assert scalar.tolist() == [0.5, 1.5]
        assert {("weight_scale_inv", 0), ("weight_scale_inv", 1)} <= layer.loaded_shards


def test_row_parallel_splits_the_declared_input_dim_only():
    """A transposed [k, n] tensor (in_dim 0) and a per-channel vector kept whole on every rank."""
    gen = torch.Generator().manual_seed(2)
    transposed, channel, weight = torch.randn(6, 4, generator=gen), torch.randn(4, generator=gen), \
        torch.randn(4, 6, generator=gen)
    for rank in range(2):
        layer = RowParallelLinear(6, 4, prefix="m.down_proj", tp_rank=rank, tp_size=2)
        t = _declared(layer, "quant_weight", (3, 4), torch.float32, out_dim=1, in_dim=0)
        c = _declared(layer, "weight_scale", (4,), torch.float32, out_dim=0)
        layer.weight.weight_loader(layer.weight, weight)
        layer.weight_loader(t, transposed)
        layer.weight_loader(c, channel)
        assert torch.equal(layer.weight.data, weight[:, 3 * rank:3 * rank + 3])
        assert torch.equal(t.data, transposed[3 * rank:3 * rank + 3]) and torch.equal(c.data, channel)


@pytest.mark.parametrize("tp_size", [1, 2])
def test_a_column_checkpoint_with_extra_rows_fails_naming_it(tp_size):
    layer = ColumnParallelLinear(3, [4], prefix="m.up_proj", tp_rank=0, tp_size=tp_size)
    with pytest.raises(ValueError, match=r"m.up_proj.weight: checkpoint tensor has shape \(5, 3\), expected"):
        layer.weight.weight_loader(layer.weight, torch.zeros(5, 3))


def test_bad_shard_ids_and_dtypes_are_named():
    qkv = QKVParallelLinear(3, 2, 2, 2, prefix="m.qkv_proj")
    with pytest.raises(ValueError, match=r"m.qkv_proj: shard id 'x' is not one of q, k, v"):
        qkv.weight.weight_loader(qkv.weight, torch.zeros(4, 3), "x")
    merged = MergedColumnParallelLinear(3, [2, 2], prefix="m.gate_up_proj")
    with pytest.raises(ValueError, match=r"m.gate_up_proj: shard id 2 out of range for 2 fused shards"):
        merged.weight.weight_loader(merged.weight, torch.zeros(2, 3), 2)
    with pytest.raises(ValueError, match=r"m.gate_up_proj: fused layer needs a shard id"):
        merged.weight.weight_loader(merged.weight, torch.zeros(4, 3))
    plain = ReplicatedLinear(3, 2, prefix="m.o_proj")
    with pytest.raises(ValueError, match=r"m.o_proj: unexpected shard id 0 for an unfused layer"):
        plain.weight.weight_loader(plain.weight, torch.zeros(2, 3), 0)
    with pytest.raises(ValueError, match=r"m.o_proj.weight: checkpoint tensor has dtype torch.int8, "
                                         r"but the layer is unquantized"):
        plain.weight.weight_loader(plain.weight, torch.zeros(2, 3, dtype=torch.int8))
    scale = _declared(plain, "weight_scale", (2,), torch.float32, out_dim=0)
    with pytest.raises(ValueError, match=r"m.o_proj.weight_scale: expected a floating-point tensor"):
        plain.weight_loader(scale, torch.zeros(2, dtype=torch.int32))
