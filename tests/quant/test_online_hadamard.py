"""The online Hadamard rotation before a Linear (`online_hadamard` in an ascendV1 description): a tiny
Llama whose down_proj weights hold W @ blockdiag(H_b) (tests/quant/hadamard_writer.py) computes the
float model's logits when the runtime rotates those inputs, and visibly does not when the key is
missing or names another block size; malformed keys fail naming the key and what is wrong.

Tolerances: a FLOAT rotated checkpoint differs from the float model only by the fp32 rounding of
W @ H (computed in float64, rounded once) and of the kernel's matmul: logits |l| ~ 5, atol 1e-5.
W8A8 static everywhere: the bound of tests/quant/test_w8a8.py (relative L2 logits error < 0.08);
measured 0.037 rotated (0.039 for the same model unrotated), 1.08 with the key dropped.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from ascend_llm import LLM, SamplingParams
from ascend_llm.layers.linear import RowParallelLinear
from ascend_llm.numerics.hadamard import rotate_input_blocks
from ascend_llm.ops import build_op_set
from ascend_llm.quant.audit import audit_model, audit_report
from ascend_llm.quant.w8a8 import AscendW8A8Config
from tests.ops.npu_emulation import npu_emulation  # noqa: F401  (fixture)
from tests.quant.hadamard_writer import write_rotated_checkpoint
from tests.quant.peer_fixtures import build_dir, prefill_logits

BLOCK = 32                       # tiny Llama: intermediate_size 96 = 3 blocks
TOKENS = torch.randint(3, 300, (33,), generator=torch.Generator().manual_seed(7)).tolist()
DOWN = "model.layers.0.mlp.down_proj"


@pytest.fixture(scope="module")
def dirs(tiny_llama_dir, tmp_path_factory):
    return {"float": tiny_llama_dir,
            "rotated_float": write_rotated_checkpoint(tiny_llama_dir, tmp_path_factory.mktemp("rot_float"), BLOCK,
                                                      {"": "FLOAT"}),
            "rotated_w8a8": write_rotated_checkpoint(tiny_llama_dir, tmp_path_factory.mktemp("rot_w8a8"), BLOCK)}


@pytest.fixture(scope="module")
def float_logits(dirs):
    config, model = build_dir(dirs["float"])
    return prefill_logits(model, config, TOKENS, torch.float32)


def _logits(model_dir) -> torch.Tensor:
    config, model = build_dir(model_dir)
    return prefill_logits(model, config, TOKENS, torch.float32)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def _edited(src, tmp_path, edit) -> object:
    """A copy of checkpoint `src` whose description `edit(description)` changed."""
    dst = tmp_path / "edited"
    shutil.copytree(src, dst)
    path = dst / "quant_model_description.json"
    description = json.loads(path.read_text())
    edit(description)
    path.write_text(json.dumps(description))
    return dst


def test_rotated_float_checkpoint_is_exact_and_audited(dirs, float_logits):
    config, model = build_dir(dirs["rotated_float"])
    torch.testing.assert_close(prefill_logits(model, config, TOKENS, torch.float32), float_logits,
                               rtol=0, atol=1e-5)
    layers = {entry["layer"]: entry for entry in audit_report(audit_model(model), "cpu")["layers"]}
    for i in range(config.num_hidden_layers):
        down = layers[f"model.layers.{i}.mlp.down_proj"]
        assert down["scheme"] == "FLOAT" and down["input_transform"] == f"hadamard({BLOCK})"
        assert {"op": "hadamard_transform", "kernel": "cpu.hadamard_matmul", "path": "native",
                "rejected": []} in down["kernels"]
        assert layers[f"model.layers.{i}.self_attn.o_proj"]["input_transform"] is None
    assert model.model.layers[0].mlp.down_proj.input_hadamard_block == BLOCK


def test_rotated_w8a8_checkpoint_is_close_to_float(dirs, float_logits):
    config, model = build_dir(dirs["rotated_w8a8"])
    down = model.model.layers[1].mlp.down_proj
    assert down.weight.dtype == torch.int8 and down.input_hadamard_block == BLOCK
    error = _relative_error(prefill_logits(model, config, TOKENS, torch.float32), float_logits)
    assert 0 < error < 0.08, error


@pytest.mark.parametrize("edit", ["drop_key", "other_block"])
def test_missing_key_or_other_block_computes_something_else(dirs, float_logits, tmp_path, edit):
    def change(description):
        if edit == "drop_key":
            del description["online_hadamard"]
        else:
            description["online_hadamard"]["block_size"] = 16      # divides 96 too: loads, wrong rotation
    error = _relative_error(_logits(_edited(dirs["rotated_w8a8"], tmp_path, change)), float_logits)
    assert error > 0.3, error        # measured 1.08 both; the rotated checkpoint with its key: 0.037


def test_block_that_does_not_divide_the_input_names_layer_and_sizes(dirs, tmp_path):
    def change(description):
        description["online_hadamard"]["block_size"] = 64
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj: online_hadamard block_size 64 "
                                         r"does not divide the layer's input size 96; block sizes that fit: "
                                         r"\[2, 4, 8, 16, 32\]"):
        build_dir(_edited(dirs["rotated_w8a8"], tmp_path, change))


_NOT_BUILT = ("model.layers.7.mlp.down_proj", "model.layers.0.self_attn")


def _list_layers_the_model_lacks(description):
    for name in _NOT_BUILT:
        description[f"{name}.weight"] = "FLOAT"        # passes the description check: listed tensors
        description["online_hadamard"]["layers"].append(name)


def _with_layers_the_model_lacks(src, tmp_path):
    """The rotated checkpoint plus tensors (and description entries) for layers the model does not build."""
    dst = _edited(src, tmp_path, _list_layers_the_model_lacks)
    save_file({f"{name}.weight": torch.zeros(64, 96) for name in _NOT_BUILT}, str(dst / "extra.safetensors"))
    return dst


_NOT_ROTATABLE = (r"'online_hadamard'\.layers names 2 layer\(s\) that the built LlamaForCausalLM cannot rotate: "
                  r"'model\.layers\.7\.mlp\.down_proj' \(no such layer in the built model\), "
                  r"'model\.layers\.0\.self_attn' \(a LlamaAttention, not a Linear layer\); "
                  r"only its Linear layers take an online rotation")


def test_listed_layer_missing_from_the_built_model_or_not_a_linear_is_named(dirs, tmp_path):
    with pytest.raises(ValueError, match=r"quant_model_description\.json: " + _NOT_ROTATABLE):
        build_dir(_with_layers_the_model_lacks(dirs["rotated_w8a8"], tmp_path))


def test_engine_load_refuses_a_layer_it_cannot_rotate(dirs, tmp_path):
    """The same check on the engine's own load path (ModelRunner), before any weight is read."""
    with pytest.raises(ValueError, match=_NOT_ROTATABLE):
        LLM(str(_with_layers_the_model_lacks(dirs["rotated_w8a8"], tmp_path)), max_model_len=64)


def _description(spec: object, **extra: str) -> dict:
    tensors = {f"model.layers.0.mlp.{p}.weight": "FLOAT" for p in ("gate_proj", "up_proj", "down_proj")}
    return {"model_quant_type": "FLOAT", "lm_head.weight": "FLOAT", **tensors, **extra, "online_hadamard": spec}


@pytest.mark.parametrize("spec,message", [
    ([DOWN], r"'online_hadamard' must be an object"),
    ({"layers": [DOWN]}, r"'online_hadamard' must have exactly the keys 'block_size' and 'layers'"),
    ({"block_size": 32, "layers": [DOWN], "scale": 1}, r"exactly the keys .* got \['block_size', 'layers', 'scale'\]"),
    ({"block_size": 24, "layers": [DOWN]}, r"'online_hadamard'\.block_size must be a power of two >= 2, got 24"),
    ({"block_size": True, "layers": [DOWN]}, r"block_size must be a power of two >= 2, got True"),
    ({"block_size": "32", "layers": [DOWN]}, r"block_size must be a power of two >= 2, got '32'"),
    ({"block_size": 32, "layers": []}, r"'online_hadamard'\.layers must be a non-empty list of layer names"),
    ({"block_size": 32, "layers": DOWN}, r"\.layers must be a non-empty list"),
    ({"block_size": 32, "layers": [DOWN, DOWN]}, r"\.layers lists a layer twice"),
    ({"block_size": 32, "layers": ["model.layers.0.mlp.down_prj"]},
     r"'model\.layers\.0\.mlp\.down_prj' is not a layer of this checkpoint"),
    ({"block_size": 32, "layers": ["lm_head"]}, r"'lm_head' is not a decoder Linear layer"),
])
def test_malformed_key_is_rejected_naming_it(spec, message):
    with pytest.raises(ValueError, match=r"desc\.json: .*" + message):
        AscendW8A8Config(_description(spec), source="desc.json")


def test_fused_layer_rotates_all_of_its_shards_or_none():
    both = AscendW8A8Config(_description({"block_size": 32, "layers": [
        "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]}))
    assert both.input_hadamard_block("model.layers.0.mlp.gate_up_proj") == 32
    assert both.input_hadamard_block(DOWN) is None
    one = AscendW8A8Config(_description({"block_size": 32, "layers": ["model.layers.0.mlp.gate_proj"]}),
                           source="desc.json")
    with pytest.raises(ValueError, match=r"lists \['model\.layers\.0\.mlp\.gate_proj'\] but not "
                                         r"\['model\.layers\.0\.mlp\.up_proj'\]: the shards of fused "
                                         r"model\.layers\.0\.mlp\.gate_up_proj share one input"):
        one.input_hadamard_block("model.layers.0.mlp.gate_up_proj")


def _row_parallel(block: int, rank: int, tp: int, k: int = 96, n: int = 8) -> RowParallelLinear:
    spec = {"block_size": block, "layers": [DOWN]}
    return RowParallelLinear(k, n, quant_config=AscendW8A8Config(_description(spec)), prefix=DOWN,
                             tp_rank=rank, tp_size=tp, ops=build_op_set("cpu"))


def test_tp2_row_parallel_shards_rotate_exactly():
    """Each rank rotates its own input slice: the blocks are block-diagonal, so with the shard a whole
    number of blocks the ranks' partial sums add up to the float product (no collective needed here:
    the layers are built per rank without a group, their partial outputs summed by hand)."""
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(8, 96, generator=g, dtype=torch.float64), torch.randn(5, 96, generator=g, dtype=torch.float64)
    rotated = rotate_input_blocks(w, 16).float()
    total = torch.zeros(5, 8)
    for rank in range(2):
        layer = _row_parallel(16, rank, 2)
        layer.weight.weight_loader(layer.weight, rotated)
        layer.quant_method.process_weights_after_loading(layer)
        total += layer(x.float()[:, rank * 48:(rank + 1) * 48])
    torch.testing.assert_close(total, (x @ w.T).float(), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"down_proj: online_hadamard block_size 32 does not divide the layer's "
                                         r"input size 96 split over tensor_parallel_size 2 \(48 per rank; each "
                                         r"rank's shard must hold whole blocks\); block sizes that fit: \[2, 4, 8, 16\]"):
        _row_parallel(32, 1, 2)


def test_rotated_layer_compiles_in_one_graph(monkeypatch):
    """torch.compile (dynamo, fullgraph) traces the bound kernel: the matrix was built at bind time.
    The float matmul is F.linear here: the CPU GEMV / oneDNN custom ops have no fake kernels (a
    limitation of those ops, not of the rotation)."""
    monkeypatch.setenv("ASCEND_LLM_DISABLE_KERNELS", "cpu.gemv_linear,cpu.onednn_linear,cpu.onednn_dense_linear")
    layer = _row_parallel(32, 0, 1)
    layer.weight.weight_loader(layer.weight, torch.randn(8, 96))
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(3, 96)
    assert [c.kernel.name for c in layer.kernel_choices] == ["cpu.hadamard_matmul", "cpu.linear"]
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)


def test_rotated_w8a8_on_the_emulated_npu_matches_cpu(dirs, npu_emulation):
    """float16 on both backends; bound as tests/quant/test_peer_fixtures_npu.py's int8-activation
    checkpoints (max 0.15 / mean 0.03: the NPU's fused ops round once where the CPU rounds between
    steps, flipping an int8 activation step now and then; measured max 0.086, mean 0.013)."""
    config, cpu_model = build_dir(dirs["rotated_w8a8"], build_op_set("cpu"), torch.float16)
    _, npu_model = build_dir(dirs["rotated_w8a8"], build_op_set("npu"), torch.float16)
    down = npu_model.model.layers[0].mlp.down_proj
    assert [c.kernel.name for c in down.kernel_choices] == ["npu.hadamard_batch_matmul", "npu.w8a8_static"]
    want = prefill_logits(cpu_model, config, TOKENS, torch.float16)
    got = prefill_logits(npu_model, config, TOKENS, torch.float16)
    err = (got - want).abs()
    assert float(err.max()) < 0.15 and float(err.mean()) < 0.03, (err.max(), err.mean())
    assert npu_emulation.called("npu_quant_matmul")


def test_expert_of_a_fused_moe_layer_is_refused():
    description = {"model_quant_type": "W8A8_DYNAMIC", "model.layers.0.mlp.experts.0.down_proj.weight": "W8A8_DYNAMIC",
                   "online_hadamard": {"block_size": 32, "layers": ["model.layers.0.mlp.experts.0.down_proj"]}}
    moe = torch.nn.Module()
    moe.is_fused_moe, moe.num_experts = True, 1
    with pytest.raises(ValueError, match=r"lists 'model\.layers\.0\.mlp\.experts\.0\.down_proj', an expert of fused "
                                         r"MoE layer model\.layers\.0\.mlp\.experts: online rotation is supported on "
                                         r"Linear layers only"):
        AscendW8A8Config(description).get_quant_method(moe, "model.layers.0.mlp.experts")


@pytest.mark.slow
def test_rotated_w8a8_decode_graphs_on_the_emulated_npu_match_eager(dirs, npu_emulation):
    """ACL decode graphs (tests/graph/test_npu_decode_graph_engine.py's set-up): the replayed
    rotation reads the H_b built at load, so graph decode equals eager decode bit for bit."""
    prompts = [[(7 * i + 13 * j) % 381 + 3 for j in range(3 + 5 * i)] for i in range(3)]
    params = [SamplingParams(max_tokens=3 + 2 * i, temperature=0.0, ignore_eos=True, logprobs=1) for i in range(3)]

    def run(**kwargs):
        llm = LLM(str(dirs["rotated_w8a8"]), device="npu", dtype="float16", max_model_len=64, max_num_seqs=4,
                  **kwargs)
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
        return llm, [(o.outputs[0].token_ids, [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs,
                                                                              o.outputs[0].token_ids)]) for o in outs]

    _, eager = run(enforce_eager=True)
    llm, graphed = run()
    graphs = llm.llm_engine.model_runner.decode_graphs
    assert graphs.num_steps > 0 and graphed == eager
    down = llm.llm_engine.model_runner.model.model.layers[1].mlp.down_proj
    assert down.kernel_choices[0].kernel.name == "npu.hadamard_batch_matmul"
