"""compressed-tensors `transform_config` in the runtime's loader (quant/compressed_tensors_transform.py).

Golden data from the peer tools themselves (scripts/make_ct_transform_fixtures.sh ->
scripts/peer_ct_transform.py in the llm-compressor virtualenv; tests/fixtures/ct_transform/MANIFEST.json):
- hadamard_io.safetensors: compressed-tensors' own "hadamard" input transform (TransformScheme
  head_dim 32 and 512, applied by `apply_transform_config` to an identity Linear) on fixed inputs;
  our `hadamard_transform` CPU kernel reproduces it to fp32 rounding (measured 9e-7, bound 1e-5);
- llmcompressor_spinquant_r4: llm-compressor's SpinQuantModifier(rotations=["R4"],
  transform_block_size=32) + W8A8 dynamic on a tiny Llama. Reference logits: transformers'
  decompressed model with compressed-tensors applying the config's online entries (what vLLM
  runs: vllm/model_executor/layers/quantization/compressed_tensors/transform/linear.py
  `get_linear_transform_schemes` keeps `args.is_online()` entries only). Bound: the
  dynamic int8 bound of tests/calib/test_convert.py (0.1 max / 0.02 mean: compressed-tensors'
  per-token grid is amax / 127.5, ours amax / 127); measured 0.036 / 0.0082. Without the rotation
  the logits are off by 2.27 max (the `logits_without_transform` transformers alone computes);
- converted_llama_w8a8_r4: our converter's output of a rotated static W8A8 tiny Llama; the same
  reference matches to 1e-4 (measured 9.5e-7), so no reader rotates the stored weights again.
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ascend_llm.numerics.hadamard import hadamard_matrix
from ascend_llm.ops import build_op_set
from ascend_llm.quant.compressed_tensors import CompressedTensorsConfig
from tests.quant.peer_fixtures import batch_logits, build_dir

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "ct_transform"
SPINQUANT, CONVERTED = FIXTURES / "llmcompressor_spinquant_r4", FIXTURES / "converted_llama_w8a8_r4"
DOWN = "model.layers.0.mlp.down_proj"


def _quant_config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())["quantization_config"]


def test_manifest_names_the_tools():
    manifest = json.loads((FIXTURES / "MANIFEST.json").read_text())
    assert manifest["compressed_tensors_version"] and manifest["llmcompressor_version"]
    assert manifest["hadamard_io"] == {"b32": [3, 96], "b512": [2, 1024]}


@pytest.mark.parametrize("block", [32, 512])
def test_our_hadamard_transform_is_compressed_tensors_hadamard(block):
    io = load_file(str(FIXTURES / "hadamard_io.safetensors"))
    x, want = io[f"x_b{block}"], io[f"y_b{block}"]
    got = build_op_set("cpu").get("hadamard_transform", block_size=block)(x, block)   # the registry's CPU kernel
    assert float((got - want).abs().max()) < 1e-5
    assert float((got - x).abs().max()) > 0.1                       # it is a rotation, not identity


@pytest.mark.parametrize("case, bounds", [(SPINQUANT, (0.1, 0.02)), (CONVERTED, (1e-4, 1e-4))])
def test_rotated_compressed_tensors_checkpoints_match_transformers_with_the_transform(case, bounds):
    ref = load_file(str(case / "reference.safetensors"))
    config, model = build_dir(case)
    rotated = {n: m.input_hadamard_block for n, m in model.named_modules()
               if getattr(m, "input_hadamard_block", None)}
    assert rotated == {f"model.layers.{i}.mlp.down_proj": 32 for i in range(2)}
    got = batch_logits(model, config, ref["input_ids"])
    err = (got - ref["logits"]).abs()
    assert float(err.max()) < bounds[0] and float(err.mean()) < bounds[1], (err.max(), err.mean())
    assert float((got - ref["logits_without_transform"]).abs().max()) > 1.0


def test_the_spinquant_config_is_llm_compressors_r4_form():
    """What llm-compressor wrote (and our converter writes, with exact layer names as targets)."""
    r4 = _quant_config(SPINQUANT)["transform_config"]["config_groups"]["R4"]
    assert (r4["type"], r4["head_dim"], r4["randomize"]) == ("hadamard", 32, False)
    assert [(a["location"], a["inverse"]) for a in r4["apply"]] == [("input", False), ("weight_input", True)]
    ours = _quant_config(CONVERTED)["transform_config"]["config_groups"]["R4"]
    assert [(a["location"], a["inverse"]) for a in ours["apply"]] == [("input", False), ("weight_input", True)]
    assert ours["apply"][0]["targets"] == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]


def _r4(**changes) -> dict:
    config = copy.deepcopy(_quant_config(SPINQUANT))
    scheme = config["transform_config"]["config_groups"]["R4"]
    apply = changes.pop("apply", None)
    scheme.update(changes)
    if apply is not None:
        scheme["apply"] = apply
    return config


@pytest.mark.parametrize("changes, match", [
    ({"type": "random-hadamard"}, r"R4: transform type 'random-hadamard' is not supported"),
    ({"type": "random-matrix"}, r"R4: transform type 'random-matrix'"),
    ({"randomize": True}, r"R4\.randomize: True is not supported"),
    ({"head_dim": None}, r"scheme 'R4' has head_dim null"),
    ({"head_dim": 48}, r"scheme 'R4' head_dim 48 must be a power of two"),
    ({"apply": [{"targets": ["re:.*o_proj$"], "location": "output"}]},
     r"online 'output' transforms \(scheme 'R4'\) are not supported"),
    ({"apply": [{"targets": ["re:.*self_attn$"], "location": "q_attn"}]}, r"online 'q_attn'"),
    ({"apply": [{"targets": ["Linear"], "location": "input"}]}, r"scheme 'R4' rotates the input of lm_head"),
    ({"precision": "torch.float32", "seed": 1}, r"R4: unknown field 'seed'"),
])
def test_unsupported_transforms_are_refused_naming_the_scheme(changes, match):
    with pytest.raises(ValueError, match=match):
        CompressedTensorsConfig.from_config(_r4(**changes), source="config.json")


def test_fused_weight_transforms_only_are_accepted_without_an_online_op():
    """R1 / R2 style offline pairs are already in the saved weights (vLLM skips them too)."""
    config = _r4(apply=[{"targets": ["re:.*o_proj$"], "location": "weight_output"},
                        {"targets": ["re:.*down_proj$"], "location": "weight_input", "inverse": True}])
    parsed = CompressedTensorsConfig.from_config(config, source="config.json")
    assert parsed.transforms == [] and parsed.input_hadamard_block(DOWN) is None


def test_fused_shards_must_share_the_input_rotation():
    config = _r4(apply=[{"targets": ["re:.*gate_proj$"], "location": "input"}])
    parsed = CompressedTensorsConfig.from_config(config, {"gate_up_proj": ("gate_proj", "up_proj")}, "config.json")
    with pytest.raises(ValueError, match="gate_up_proj: the fused shards have different online input transforms"):
        parsed.input_hadamard_block("model.layers.0.mlp.gate_up_proj")


def test_a_stored_matrix_that_is_not_sylvester_is_refused(tmp_path):
    """The `R4_input.weight` tensor is checked: a permuted Hadamard (randomize) is not ours."""
    dst = tmp_path / "ckpt"
    shutil.copytree(SPINQUANT, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    name = f"{DOWN}.R4_input.weight"
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    tensors[name] = (hadamard_matrix(32, torch.float64) * 32 ** 0.5)[perm][:, perm]
    save_file(tensors, str(dst / "model.safetensors"))
    with pytest.raises(ValueError, match=f"{name}: not the Sylvester Hadamard matrix of size 32"):
        build_dir(dst)
