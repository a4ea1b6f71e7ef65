"""ERNIE-4.5-MoE, Qwen2-MoE and Qwen3-MoE against transformers' own modeling code (fp32), greedy
generation through `LLM`, routing semantics, and clear errors for bad expert checkpoints."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from ascend_llm import LLM, SamplingParams
from ascend_llm.layers.moe_routing import RoutingConfig, select_experts
from tests.models.test_logits_vs_transformers import build_ours, reference_logits, run_chunks
from tests.tiny_models import make_tiny_moe_model_dir

ARCHS = ["ernie4_5_moe", "qwen2_moe", "qwen3_moe"]
# fp32 on both sides, same routing decisions; only summation order differs (measured <= 2e-6)
LOGITS_ATOL = 2e-4


@pytest.fixture(scope="module", params=ARCHS)
def moe_dir(request, tmp_path_factory):
    return make_tiny_moe_model_dir(tmp_path_factory.mktemp(request.param), request.param)


def _token_ids(n: int = 23) -> list[int]:
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(1)).tolist()


@pytest.mark.parametrize("chunks", [[23], [7, 9, 1, 1, 5]])
def test_logits_match_transformers(moe_dir, chunks):
    config, ours = build_ours(moe_dir)
    got = run_chunks(ours, config, _token_ids(), chunks)
    want = reference_logits(moe_dir, _token_ids())
    assert torch.allclose(got, want, atol=LOGITS_ATOL, rtol=0), (got - want).abs().max()
    assert want.std() > 0.1


def test_the_models_have_what_the_test_means_to_cover(moe_dir):
    config, ours = build_ours(moe_dir)
    blocks = [layer.mlp for layer in ours.model.layers]
    assert not hasattr(blocks[0], "experts") and all(hasattr(b, "experts") for b in blocks[1:])
    arch = config.model_type
    if arch == "ernie4_5_moe":
        assert blocks[1].shared_experts is not None
        assert blocks[1].moe_statics.e_score_correction_bias.abs().min() > 0
    if arch == "qwen2_moe":
        gate = blocks[1].shared_expert_gate.weight
        assert (gate.to_dense() if gate.is_mkldnn else gate).abs().sum() > 0     # oneDNN-packed on AMD


def test_ernie_correction_bias_changes_routing(tmp_path_factory):
    """The bias must matter for the comparison above to test it: zeroing it changes the logits."""
    src = make_tiny_moe_model_dir(tmp_path_factory.mktemp("ernie_bias"), "ernie4_5_moe")
    _, ours = build_ours(src)
    block = ours.model.layers[1].mlp
    hidden = torch.randn(64, 64, generator=torch.Generator().manual_seed(3))
    logits = block.gate(hidden)
    with_bias = select_experts(logits, block.experts.routing, block.moe_statics.e_score_correction_bias)[1]
    without = select_experts(logits, block.experts.routing)[1]
    assert not torch.equal(with_bias, without)


def test_greedy_generation_through_llm_matches_transformers(moe_dir):
    prompt = _token_ids(9)
    llm = LLM(str(moe_dir), max_model_len=128)
    out = llm.generate(prompt_token_ids=[prompt], use_tqdm=False,
                       sampling_params=SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    hf = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert list(out[0].outputs[0].token_ids) == want


# ---------------------------------------------------------------- routing semantics

def test_softmax_routing_renormalizes_with_norm_min():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    weights, ids = select_experts(logits, RoutingConfig(2, renormalize=True, norm_min=1e-12))
    assert ids.tolist() == [[0, 1]]
    torch.testing.assert_close(weights.sum(-1), torch.ones(1))
    raw, _ = select_experts(logits, RoutingConfig(2))
    torch.testing.assert_close(raw, logits.softmax(-1)[:, :2])


def test_correction_bias_ranks_but_does_not_weight():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    weights, ids = select_experts(logits, RoutingConfig(2), bias)
    assert sorted(ids[0].tolist()) == [0, 3]
    probs = logits.softmax(-1)[0]
    assert sorted(weights[0].tolist()) == sorted([probs[0].item(), probs[3].item()])


def test_sigmoid_routing_with_bias():
    logits = torch.tensor([[0.5, -0.2, 1.5, 0.1]])
    bias = torch.tensor([0.0, 2.0, 0.0, 0.0])
    weights, ids = select_experts(logits, RoutingConfig(2, "sigmoid", renormalize=True), bias)
    assert ids[0].tolist() == [1, 2]
    scores = logits.sigmoid()[0, [1, 2]]
    torch.testing.assert_close(weights[0], scores / scores.sum())


def test_bad_routing_config():
    with pytest.raises(ValueError, match="scoring_func"):
        RoutingConfig(2, "relu")
    with pytest.raises(ValueError, match="top_k 5 exceeds"):
        select_experts(torch.zeros(1, 4), RoutingConfig(5))


# ---------------------------------------------------------------- bad checkpoints

def _edit_checkpoint(src, dst, edit_tensors=None, edit_config=None):
    shutil.copytree(src, dst)
    if edit_tensors is not None:
        tensors = edit_tensors(load_file(str(dst / "model.safetensors")))
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if edit_config is not None:
        config = json.loads((dst / "config.json").read_text())
        edit_config(config)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    return make_tiny_moe_model_dir(tmp_path_factory.mktemp("qwen3_bad"), "qwen3_moe")


def test_missing_expert_tensor_is_named(qwen3_dir, tmp_path):
    name = "model.layers.2.mlp.experts.5.up_proj.weight"
    bad = _edit_checkpoint(qwen3_dir, tmp_path / "m", lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(ValueError, match=f"missing tensor '{name}'"):
        build_ours(bad)


def test_checkpoint_with_more_experts_than_config(qwen3_dir, tmp_path):
    def six_experts(config):      # transformers maps num_experts to num_local_experts
        config["num_local_experts" if "num_local_experts" in config else "num_experts"] = 6
    bad = _edit_checkpoint(qwen3_dir, tmp_path / "m", edit_config=six_experts)
    with pytest.raises(ValueError, match="expert id 6 is out of range.*num_experts=6"):
        build_ours(bad)


def test_checkpoint_with_fewer_experts_than_config(qwen3_dir, tmp_path):
    def drop_expert_7(tensors):
        return {k: v for k, v in tensors.items() if ".experts.7." not in k}
    bad = _edit_checkpoint(qwen3_dir, tmp_path / "m", drop_expert_7)
    missing = r"missing tensor 'model\.layers\.1\.mlp\.experts\.7\.gate_proj\.weight'.*8 experts"
    with pytest.raises(ValueError, match=missing):
        build_ours(bad)


def test_expert_tensor_with_wrong_shape(qwen3_dir, tmp_path):
    name = "model.layers.1.mlp.experts.0.down_proj.weight"
    bad = _edit_checkpoint(qwen3_dir, tmp_path / "m", lambda t: {**t, name: t[name][:, :16].contiguous()})
    with pytest.raises(ValueError, match=f"{name}: checkpoint tensor has shape \\(64, 16\\), expected \\(64, 32\\)"):
        build_ours(bad)


def test_ernie_skips_mtp_tensors(tmp_path_factory, tmp_path):
    src = make_tiny_moe_model_dir(tmp_path_factory.mktemp("ernie_mtp"), "ernie4_5_moe")
    extra = {"model.mtp_block.0.mlp.gate_proj.weight": torch.ones(4, 4), "model.mtp_emb_norm.0.weight": torch.ones(4)}
    with_mtp = _edit_checkpoint(src, tmp_path / "m", lambda t: {**t, **extra})
    config, ours = build_ours(with_mtp)
    got = run_chunks(ours, config, _token_ids(), [23])
    assert torch.allclose(got, reference_logits(src, _token_ids()), atol=LOGITS_ATOL, rtol=0)


def test_experts_for_a_dense_layer(qwen3_dir, tmp_path):
    bad = _edit_checkpoint(qwen3_dir, tmp_path / "m", edit_config=lambda c: c.update(mlp_only_layers=[0, 2]))
    with pytest.raises(ValueError, match="no MoE layer 'model.layers.2.mlp.experts'"):
        build_ours(bad)
