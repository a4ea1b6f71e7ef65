"""Single-process units of tensor parallelism: the context, identity collectives at world size 1,
vocab shards, per-rank KV cache shapes, sharding errors, the TP=1 model built without a group."""
from __future__ import annotations

import pytest
import torch

from ascend_llm.distributed.communication import splits_input
from ascend_llm.distributed.parallel_state import ParallelContext, torchrun_env
from ascend_llm.engine.kv_cache import KVCacheSpec
from ascend_llm.layers.embedding import VocabShard
from ascend_llm.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from ascend_llm.ops import build_op_set
from ascend_llm.quant.fp8 import BlockWiseFp8Config
from ascend_llm.models.moe_common import PartialRowParallelLinear
from ascend_llm.quant.weight_only import WeightOnlyCheckpointConfig
from tests.tiny_models import tiny_config


def test_context_validates_rank_and_reports_roles():
    with pytest.raises(ValueError, match=r"rank: 2 is not in \[0, world_size=2\)"):
        ParallelContext(rank=2, world_size=2)
    single = ParallelContext()
    assert not single.is_distributed and single.is_driver and single.device == torch.device("cpu")
    assert not ParallelContext(rank=1, world_size=2).is_driver


@pytest.mark.parametrize("op", ["all_reduce", "all_gather"])
def test_collectives_are_registered_and_identities_on_one_rank(op):
    ops = build_op_set("cpu")
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    fn = ops.get(op)
    assert ops.select(op).name == f"cpu.dist.{op}"
    assert fn(x, ParallelContext()) is x and fn(x, None) is x


def test_vocab_shard_rows_and_zero_padding():
    loaded = torch.arange(10 * 2, dtype=torch.float32).reshape(10, 2) + 1     # [vocab 10, hidden 2]
    parts = []
    for rank in range(4):
        shard = VocabShard(10, ParallelContext(rank=rank, world_size=4))
        assert shard.size == 3 and shard.start == 3 * rank
        param = torch.full((3, 2), -1.0)
        shard.load_rows(param, loaded, "embed_tokens.weight")
        parts.append(param)
    full = torch.cat(parts)                                                   # [12, 2]
    assert torch.equal(full[:10], loaded) and torch.equal(full[10:], torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"embed_tokens.weight: checkpoint tensor has shape \(9, 2\)"):
        VocabShard(10, None).load_rows(torch.empty(10, 2), loaded[:9], "embed_tokens.weight")


@pytest.mark.parametrize("tp, kv_heads", [(1, 2), (2, 1), (4, 1)])
def test_kv_cache_spec_holds_this_ranks_heads(tp, kv_heads):
    config, _ = tiny_config("llama")                                          # 4 heads, 2 KV heads
    assert KVCacheSpec.from_hf_config(config, 16, torch.float32, tp).num_kv_heads == kv_heads


def test_qkv_rejects_head_counts_that_do_not_split():
    with pytest.raises(ValueError, match="num_attention_heads 9 is not divisible by tensor_parallel_size 2"):
        QKVParallelLinear(576, 64, 9, 3, parallel=ParallelContext(rank=0, world_size=2), prefix="qkv_proj")
    with pytest.raises(ValueError, match="num_key_value_heads 4 and tensor_parallel_size 6"):
        QKVParallelLinear(768, 64, 12, 4, parallel=ParallelContext(rank=0, world_size=6), prefix="qkv_proj")
    replicated = QKVParallelLinear(768, 64, 12, 3, parallel=ParallelContext(rank=5, world_size=6))
    assert replicated.kv_replicas == 2 and replicated.output_sizes == [128, 64, 64]


def test_block_fp8_and_packed_int4_need_whole_shards():
    ctx = ParallelContext(rank=1, world_size=2)
    with pytest.raises(ValueError, match=r"m.o_proj: block-wise fp8 with tensor_parallel_size 2 needs the "
                                         r"per-rank input size \(96\) divisible by 128"):
        RowParallelLinear(192, 256, quant_config=BlockWiseFp8Config(), prefix="m.o_proj", parallel=ctx)
    RowParallelLinear(256, 256, quant_config=BlockWiseFp8Config(), prefix="m.o_proj", parallel=ctx)
    with pytest.raises(ValueError, match=r"m.down_proj: packed int4 weights split along k need an even "
                                         r"per-rank input size, got 13"):
        RowParallelLinear(26, 8, quant_config=WeightOnlyCheckpointConfig(4), prefix="m.down_proj", parallel=ctx)


def test_row_parallel_adds_bias_on_rank_zero_only():
    gen = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(4, 6, generator=gen), torch.randn(4, generator=gen)
    x = torch.randn(3, 6, generator=gen)
    total = torch.zeros(3, 4)
    for rank in range(2):                           # no group: each rank returns its partial sum
        layer = RowParallelLinear(6, 4, bias=True, prefix="m.o_proj", tp_rank=rank, tp_size=2)
        layer.weight.weight_loader(layer.weight, weight)
        layer.bias.weight_loader(layer.bias, bias)
        total += layer(x[:, 3 * rank:3 * rank + 3])
    assert torch.allclose(total, x @ weight.T + bias, atol=1e-6)


def test_row_parallel_rejects_a_checkpoint_of_the_wrong_width():
    layer = RowParallelLinear(6, 4, prefix="m.down_proj", tp_rank=1, tp_size=2)
    with pytest.raises(ValueError, match=r"m.down_proj.weight: checkpoint tensor has shape \(4, 5\), "
                                         r"expected \(4, 6\) \(split along dim 1 over 2 ranks\)"):
        layer.weight.weight_loader(layer.weight, torch.zeros(4, 5))


def test_splits_input_means_row_parallel_in_a_group_of_two_or_more():
    """distributed.communication reads the layer's `shards_input_dim` (it may not import layers)."""
    two, one = ParallelContext(rank=1, world_size=2), ParallelContext()
    assert splits_input(RowParallelLinear(6, 4, parallel=two))
    assert splits_input(PartialRowParallelLinear(6, 4, parallel=two))
    assert not splits_input(RowParallelLinear(6, 4, parallel=one))
    assert not splits_input(RowParallelLinear(6, 4, tp_rank=1, tp_size=2))   # no group
    assert not splits_input(ColumnParallelLinear(6, [4], parallel=two))
    assert not splits_input(torch.nn.Linear(6, 4))


def test_torchrun_env_needs_every_variable(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert torchrun_env() is None
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    with pytest.raises(ValueError, match="MASTER_PORT: must be set"):
        torchrun_env()
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert torchrun_env() == {"rank": 1, "world_size": 2, "local_rank": 1, "init_method": "env://"}


def test_architectures_without_tensor_parallel_layers_are_refused_up_front():
    from ascend_llm.executor.launch import validate_tp_config
    from ascend_llm.models.llama import LlamaForCausalLM

    class DenseOnlyForCausalLM(torch.nn.Module):
        pass

    config, _ = tiny_config("llama")
    validate_tp_config(config, 2, LlamaForCausalLM)
    with pytest.raises(ValueError, match="DenseOnlyForCausalLM does not support tensor parallelism yet"):
        validate_tp_config(config, 2, DenseOnlyForCausalLM)
