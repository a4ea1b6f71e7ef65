"""TP=2 with an online Hadamard before down_proj (gloo on CPU, tests/distributed/tp_harness.py):
each rank rotates its own slice of the row-parallel input, exact because the rotation is
block-diagonal and the slice holds whole blocks, so TP=2 logits equal TP=1's up to the fp32 order
of the all-reduce (bound 1e-4, as tests/distributed/test_tp_logits.py's exact kinds); a block that
straddles the shard boundary fails on every rank with the layer, sizes and tp named."""
from __future__ import annotations

import pytest
import torch

from tests.distributed.tp_harness import Job, spawn_logits
from tests.quant.hadamard_writer import write_rotated_checkpoint
from tests.tiny_models import make_tiny_model_dir


@pytest.mark.slow
def test_tp2_rotated_checkpoint_matches_tp1(tmp_path_factory):
    float_dir = make_tiny_model_dir(tmp_path_factory.mktemp("llama"), "llama", seed=3)
    jobs = [Job("float", str(float_dir)),
            Job("block16", str(write_rotated_checkpoint(float_dir, tmp_path_factory.mktemp("b16"), 16, {"": "FLOAT"}))),
            Job("block32", str(write_rotated_checkpoint(float_dir, tmp_path_factory.mktemp("b32"), 32, {"": "FLOAT"})))]
    tp1, tp2 = spawn_logits(1, jobs), spawn_logits(2, jobs)
    assert float((tp1["block16"] - tp1["float"]).abs().max()) <= 1e-4       # the rotation is folded exactly
    assert float((tp2["block16"] - tp1["block16"]).abs().max()) <= 1e-4
    assert torch.equal(tp2["block16"].argmax(-1), tp1["block16"].argmax(-1))
    assert isinstance(tp1["block32"], torch.Tensor)                          # 96 = 3 blocks of 32 on one rank
    message = tp2["block32"]                                                 # 48 per rank: not whole blocks
    assert isinstance(message, str) and "model.layers.0.mlp.down_proj: online_hadamard block_size 32" in message
    assert "input size 96 split over tensor_parallel_size 2 (48 per rank" in message
