"""Tensor parallelism of the MoE models (ERNIE-4.5-MoE, Qwen2-MoE, Qwen3-MoE) on CPU over gloo:
TP=2 / TP=4 logits against TP=1, greedy generation through LLM(tensor_parallel_size=2), one
all-reduce per MoE block, clear errors for sizes that do not split, and fp32 routing tensors
keeping their precision in a bf16 run.

Tolerances (max |logit difference|; the logits of these tiny models span about +-2.6):
- float, online wint8, pre-quantized w4w2 (wint4 + WINT2 experts, wint8 dense): 1e-4. Every rank
  holds exactly the TP=1 weights' slices (online wint8 scales of the experts' down projection,
  whose k is the split intermediate dim, are max-reduced over the group; weight-only codes are
  dequantized element-wise), routing runs on the replicated router, so only the fp32 summation
  order of the all-reduces differs (measured <= 1.5e-6).
- W8A8_DYNAMIC experts: a rank quantizes its slice of the intermediate activation with the amax
  of that slice (per token), not of the whole row, as vLLM does; the same bound as the dense
  W8A8 dynamic case in test_tp_logits.py: max |diff| < 1.5x the TP=1 quantization error (vs the
  float model) and mean |diff| < 0.1.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file

from ascend_llm import LLM, SamplingParams
from ascend_llm.config import CacheConfig, ModelConfig
from ascend_llm.executor.launch import validate_tp_config
from ascend_llm.distributed.parallel_state import ParallelContext
from ascend_llm.engine.model_runner import ModelRunner, fp32_checkpoint_names
from ascend_llm.loader import iter_safetensors_weights, load_hf_config
from ascend_llm.models.registry import get_model_class
from ascend_llm.models.weight_utils import fused_shards, process_weights_after_loading
from ascend_llm.ops import build_op_set
from ascend_llm.ops.registry import OpSet
from ascend_llm.quant.registry import get_quant_config
from tests.distributed.tp_harness import Job, forward_batch, spawn_logits
from tests.quant.moe_checkpoints import write_w4w2, write_w8a8_dynamic
from tests.tiny_models import make_tiny_moe_model_dir, tiny_moe_config

ARCHS = ("ernie4_5_moe", "qwen2_moe", "qwen3_moe")
EXACT = 1e-4
NUM_ROWS = 18          # tp_harness: 11 + 5 prefill rows, 2 decode rows
# WINT2 splits the experts' down projection along k in 128-row scale blocks: TP=2 needs a moe
# intermediate size of 256 (128 per rank); TP=4 (64 per rank) must be refused
W4W2_INTERMEDIATE = 256


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny random models: layer 0 dense, layers 1-2 sparse (ERNIE: 2 shared experts and a
    non-zero e_score_correction_bias; Qwen2-MoE: the sigmoid-gated shared expert)."""
    return {arch: make_tiny_moe_model_dir(tmp_path_factory.mktemp(arch), arch, seed=5) for arch in ARCHS}


@pytest.fixture(scope="module")
def jobs(model_dirs, tmp_path_factory) -> list[Job]:
    result = []
    for arch, path in model_dirs.items():
        result += [Job(f"{arch}/float", str(path)), Job(f"{arch}/wint8", str(path), "wint8")]
    wide = make_tiny_moe_model_dir(tmp_path_factory.mktemp("ernie_wide"), "ernie4_5_moe", seed=5,
                                   moe_intermediate_size=W4W2_INTERMEDIATE)
    result.append(Job("ernie4_5_moe_wide/float", str(wide)))
    # layer 1's experts wint4, layer 2's WINT2 (fused up_gate_proj), dense projections wint8
    result.append(Job("ernie4_5_moe_wide/w4w2", str(write_w4w2(wide, tmp_path_factory.mktemp("w4w2"),
                                                                 w4_end_layer=1))))
    result.append(Job("qwen2_moe/w8a8_dynamic", str(write_w8a8_dynamic(
        model_dirs["qwen2_moe"], tmp_path_factory.mktemp("qwen2_w8a8d")))))
    return result


@pytest.fixture(scope="module")
def logits(jobs) -> dict[int, dict[str, torch.Tensor | str]]:
    return {tp: spawn_logits(tp, jobs) for tp in (1, 2, 4)}


def _max_diff(logits: dict, tp: int, name: str) -> float:
    want, got = logits[1][name], logits[tp][name]
    assert isinstance(want, torch.Tensor), want
    assert isinstance(got, torch.Tensor), got
    assert got.shape == want.shape == (NUM_ROWS, 384)
    return float((got - want).abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("kind", ["float", "wint8"])
@pytest.mark.parametrize("arch", ARCHS)
def test_tp_logits_match_tp1(logits, arch, kind, tp):
    name = f"{arch}/{kind}"
    diff = _max_diff(logits, tp, name)
    assert diff <= EXACT, f"{name} TP={tp}: max |diff| {diff}"
    assert torch.equal(logits[tp][name].argmax(-1), logits[1][name].argmax(-1))
    if kind == "wint8":     # really quantized (the test would not see a wrong expert scale otherwise)
        assert float((logits[1][name] - logits[1][f"{arch}/float"]).abs().max()) > 10 * EXACT


@pytest.mark.slow
def test_tp2_logits_of_w4w2_checkpoint_match_tp1(logits):
    name = "ernie4_5_moe_wide/w4w2"
    assert _max_diff(logits, 2, name) <= EXACT
    assert float((logits[1][name] - logits[1]["ernie4_5_moe_wide/float"]).abs().max()) > 10 * EXACT
    assert _max_diff(logits, 2, "ernie4_5_moe_wide/float") <= EXACT


@pytest.mark.slow
def test_w4w2_at_tp4_is_a_clear_error(logits):
    """64 intermediate rows per rank do not hold whole 128-row WINT2 scale blocks."""
    message = logits[4]["ernie4_5_moe_wide/w4w2"]
    assert isinstance(message, str) and message.startswith("ValueError"), message
    assert "model.layers.2.mlp.experts.w2_" in message and "multiple of 128" in message


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 4])
def test_tp_logits_of_w8a8_dynamic_experts_stay_within_quantization_error(logits, tp):
    name = "qwen2_moe/w8a8_dynamic"
    want, got = logits[1][name], logits[tp][name]
    diff = _max_diff(logits, tp, name)
    quant_error = float((want - logits[1]["qwen2_moe/float"]).abs().max())
    assert quant_error > 10 * EXACT
    assert diff < 1.5 * quant_error, f"TP={tp}: max |diff| {diff}, quant error {quant_error}"
    assert float((got - want).abs().mean()) < 0.1


# ---------------------------------------------------------------- through the engine

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
PROMPTS = [[5, 17, 33, 101, 250, 7], [300, 12, 9, 77, 150, 4, 4, 60, 61]]


def _generate(llm: LLM) -> tuple[list[list[int]], list[float]]:
    outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY, use_tqdm=False)
    lps = [entry[tok].logprob for p, o in zip(PROMPTS, outs)
           for tok, entry in zip(p[1:], o.prompt_logprobs[1:])]
    return [list(o.outputs[0].token_ids) for o in outs], lps


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_tp2_greedy_generation_matches_tp1(model_dirs, arch):
    path = str(model_dirs[arch])
    tokens, lps = _generate(LLM(path, max_model_len=128))
    with LLM(path, max_model_len=128, tensor_parallel_size=2) as llm:
        tp_tokens, tp_lps = _generate(llm)
    assert tp_tokens == tokens
    assert max(abs(a - b) for a, b in zip(tp_lps, lps)) < EXACT


# ---------------------------------------------------------------- one all-reduce per MoE block

class CountingOps:
    """The CPU op set with the collectives replaced by counters (no process group needed)."""

    def __init__(self, ops: OpSet) -> None:
        self._ops = ops
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ops, name)

    def get(self, op: str, **traits: Any) -> Callable[..., Any]:
        if op == "all_reduce":
            return self._count(op, lambda x, parallel, *_: x)
        if op == "all_gather":
            return self._count(op, lambda x, parallel, dim=-1: torch.cat([x] * parallel.world_size, dim))
        return self._ops.get(op, **traits)

    def _count(self, name: str, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def run(*args: Any, **kwargs: Any) -> torch.Tensor:
            self.calls[name] = self.calls.get(name, 0) + 1
            return fn(*args, **kwargs)
        return run


@pytest.mark.parametrize("arch", ARCHS)
def test_one_all_reduce_per_attention_and_per_mlp_block(model_dirs, arch):
    """Rank 0 of 2 (collectives counted, not run): embedding 1 + per layer (o_proj 1 + MLP or
    MoE block 1), the shared experts' partial sum reduced together with the routed experts'."""
    config = load_hf_config(model_dirs[arch])
    ops = CountingOps(build_op_set("cpu"))
    model = get_model_class(config)(config, ops, None, torch.float32, ParallelContext(0, 2))
    model.load_weights(iter_safetensors_weights(model_dirs[arch]))
    process_weights_after_loading(model)
    assert ops.calls == {}
    with torch.inference_mode():
        hidden = model(forward_batch(_BatchRunner(config), [[5, 17, 33], [40, 41]], [0, 0]))
        model.compute_logits(hidden[-1:])
    assert ops.calls == {"all_reduce": 1 + 2 * config.num_hidden_layers, "all_gather": 1}


class _BatchRunner:
    """What tp_harness._batch reads from a ModelRunner: a KV cache of this rank's heads."""
    null_block, device = 16, torch.device("cpu")

    def __init__(self, config: Any) -> None:
        kv_heads = max(1, config.num_key_value_heads // 2)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (17, 16, kv_heads, head_dim)
        self.kv_caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(config.num_hidden_layers)]


# ---------------------------------------------------------------- sizes that do not split

@pytest.mark.parametrize("arch, field, value", [
    ("ernie4_5_moe", "moe_intermediate_size", 34),
    ("qwen3_moe", "moe_intermediate_size", 34),
    ("qwen2_moe", "shared_expert_intermediate_size", 50),
])
def test_validate_tp_config_names_the_moe_field(arch, field, value):
    config, hf_cls = tiny_moe_config(arch, **{field: value})
    config.architectures = [hf_cls.__name__]
    model_cls = get_model_class(config)
    assert model_cls.supports_tensor_parallel
    validate_tp_config(config, 2, model_cls)
    with pytest.raises(ValueError, match=rf"tensor_parallel_size: 4 does not divide the model's "
                                         rf"{field} \({value}\); sizes that do: \[1, 2\]"):
        validate_tp_config(config, 4, model_cls)


def test_llm_refuses_a_non_dividing_moe_intermediate_size(tmp_path):
    path = make_tiny_moe_model_dir(tmp_path, "qwen3_moe", moe_intermediate_size=30)
    with pytest.raises(ValueError, match=r"does not divide the model's moe_intermediate_size \(30\)"):
        LLM(str(path), max_model_len=128, tensor_parallel_size=4)


# ---------------------------------------------------------------- fp32 tensors in a bf16 run

def test_bf16_run_keeps_fp32_routing_tensors(model_dirs):
    """ERNIE's e_score_correction_bias [1, E] and router are fp32 parameters: a bf16 run loads
    the checkpoint's fp32 values unrounded (bf16 rounding would change them, and routing)."""
    path = model_dirs["ernie4_5_moe"]
    runner = ModelRunner(ModelConfig(str(path), dtype="bfloat16"),
                         CacheConfig(block_size=16, num_gpu_blocks=8), load_hf_config(path), path, "cpu", set())
    checkpoint = load_file(str(path / "model.safetensors"))
    for name in ("model.layers.1.mlp.moe_statics.e_score_correction_bias", "model.layers.2.mlp.gate.weight"):
        want, got = checkpoint[name], runner.model.get_parameter(name)
        got = got.to_dense() if got.is_mkldnn else got          # the router may run oneDNN (packed)
        assert want.dtype == got.dtype == torch.float32 and want.dim() == 2, name
        assert torch.equal(got, want), name
        assert not torch.equal(want.to(torch.bfloat16).float(), want), name
    assert runner.model.model.layers[1].self_attn.qkv_proj.weight.dtype == torch.bfloat16


def test_fp32_expert_scales_are_recognised(model_dirs, tmp_path):
    """Per-expert W8A8 scales ([n, 1] fp32) keep fp32; weights are cast (packed names resolved)."""
    path = write_w8a8_dynamic(model_dirs["qwen2_moe"], tmp_path / "w8a8d")
    config = load_hf_config(path)
    cls = get_model_class(config)
    quant = get_quant_config(None, config, path, fused_shards(cls.packed_modules_mapping))
    keep = fp32_checkpoint_names(cls(config, build_op_set("cpu"), quant, torch.bfloat16))
    assert keep("model.layers.1.mlp.experts.3.gate_proj.weight_scale")
    assert keep("model.layers.1.mlp.experts.3.down_proj.weight_scale")
    assert keep("model.layers.1.mlp.shared_expert.up_proj.weight_scale")
    assert not keep("model.layers.1.mlp.shared_expert_gate.weight")
    assert not keep("model.layers.1.mlp.experts.3.gate_proj.weight")       # int8 codes
    assert not keep("model.embed_tokens.weight")
