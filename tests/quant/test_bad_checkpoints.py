"""Bad quantized checkpoints fail at load with a ValueError naming the tensor (or field) and what
was expected; nothing is silently loaded as float or left at a parameter's zero init.

Each case takes a correct tiny checkpoint (msModelSlim W8A8 from tests/quant/w8a8_writer.py,
FastDeploy WINT2 from the wint2 writer), breaks one thing, and loads it through `LLM`.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ascend_llm import LLM
from ascend_llm.quant.w8a8 import decode_deq_scale, encode_deq_scale_int64
from calib.wint2.writer import write_wint2_checkpoint
from tests.quant.w8a8_writer import write_w8a8_checkpoint

K_PROJ = "model.layers.0.self_attn.k_proj"            # a fused (qkv) shard: 32 rows x 64
DOWN = "model.layers.0.mlp.down_proj"                 # unfused: 64 rows x 96
MIXED = {"layers.0.mlp.down_proj": "W8A8_DYNAMIC", "layers.1.mlp.down_proj": "FLOAT"}
WEIGHTS = "quant_model_weights.safetensors"
DESCRIPTION = "quant_model_description.json"

Edit = Callable[[dict[str, torch.Tensor]], None]


@pytest.fixture(scope="module")
def w8a8_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """Static W8A8 everywhere except down_proj: W8A8_DYNAMIC in layer 0, FLOAT in layer 1."""
    return write_w8a8_checkpoint(tiny_llama_dir, tmp_path_factory.mktemp("w8a8_good"), layer_types=MIXED)


def _broken(good: Path, out: Path, edit_tensors: Edit | None = None,
            edit_description: Callable[[dict], None] | None = None) -> Path:
    shutil.copytree(good, out)
    if edit_tensors is not None:
        tensors = load_file(str(out / WEIGHTS))
        edit_tensors(tensors)
        save_file(tensors, str(out / WEIGHTS))
    if edit_description is not None:
        description = json.loads((out / DESCRIPTION).read_text())
        edit_description(description)
        (out / DESCRIPTION).write_text(json.dumps(description))
    return out


def _set(name: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Edit:
    return lambda tensors: tensors.__setitem__(name, make(tensors[name]))


def _load(model_dir: Path, **kwargs) -> LLM:
    return LLM(str(model_dir), max_model_len=64, **kwargs)


def test_good_checkpoint_loads(w8a8_dir):
    layer = _load(w8a8_dir).llm_engine.model_runner.model.model.layers[0]
    assert layer.self_attn.qkv_proj.weight.dtype == torch.int8
    assert layer.self_attn.qkv_proj.deq_scale.dtype == torch.int64     # fp32 model: int64 float bits
    assert bool((layer.self_attn.qkv_proj.input_scale > 0).all())


@pytest.mark.parametrize("edit_tensors, edit_description, message", [
    # the description names a tensor the weights lack
    (lambda t: t.pop(f"{K_PROJ}.input_scale"), None,
     f"lists tensor '{K_PROJ}.input_scale' \\(W8A8\\) but no \\*.safetensors file"),
    (None, lambda d: d.__setitem__(f"{K_PROJ}.smooth_factor", "W8A8"),
     f"lists tensor '{K_PROJ}.smooth_factor'"),
    # a quantized layer without a tensor its type needs, listed nowhere
    (lambda t: t.pop(f"{DOWN}.weight_scale"), lambda d: d.pop(f"{DOWN}.weight_scale"),
     f"{DOWN} is W8A8_DYNAMIC, which needs tensor '{DOWN}.weight_scale'; the checkpoint has none"),
    # wrong dtypes
    (_set(f"{K_PROJ}.deq_scale", lambda v: v.to(torch.int32)), None,
     r"qkv_proj.deq_scale\[k\]: checkpoint tensor has dtype torch.int32, expected int64 \(fp16 / fp32 "
     r"models\) or float32 \(bf16 models\)"),
    (_set(f"{K_PROJ}.deq_scale", lambda v: decode_deq_scale(v).half()), None,
     r"qkv_proj.deq_scale\[k\]: checkpoint tensor has dtype torch.float16, expected int64"),
    (_set(f"{K_PROJ}.weight", lambda v: v.float()), None,
     r"qkv_proj.weight\[k\]: checkpoint tensor has dtype torch.float32, expected torch.int8"),
    (_set(f"{K_PROJ}.quant_bias", lambda v: v.float()), None,
     r"qkv_proj.quant_bias\[k\]: checkpoint tensor has dtype torch.float32, expected torch.int32"),
    (_set(f"{DOWN}.weight_scale", lambda v: torch.ones_like(v, dtype=torch.int32)), None,
     r"down_proj.weight_scale: checkpoint tensor has dtype torch.int32, expected a floating-point"),
    # an int8 weight in a layer the description calls FLOAT is not cast to float
    (_set("model.layers.1.mlp.down_proj.weight", lambda v: v.to(torch.int8)), None,
     r"layers.1.mlp.down_proj.weight: checkpoint tensor has dtype torch.int8, but the layer is "
     r"unquantized and expects a floating-point weight"),
    # wrong shapes
    (_set(f"{K_PROJ}.input_scale", lambda v: v.repeat(2)), None,
     r"qkv_proj.input_scale\[k\]: expected a per-tensor value of shape \[1\], got \(2,\)"),
    (_set(f"{DOWN}.weight_scale", lambda v: torch.cat([v, v[:1]])), None,
     r"down_proj.weight_scale: checkpoint tensor has shape \(65, 1\), expected \(64, 1\)"),
    (_set(f"{K_PROJ}.deq_scale", lambda v: v[:-1].clone()), None,
     r"qkv_proj.deq_scale\[k\]: checkpoint tensor has shape \(31,\), expected \(32,\)"),
    (_set(f"{K_PROJ}.weight", lambda v: v[:, :-1].contiguous()), None,
     r"qkv_proj.weight\[k\]: checkpoint tensor has shape \(32, 63\), expected \(32, 64\)"),
    # unknown quantization strings in the description
    (None, lambda d: d.__setitem__(f"{K_PROJ}.weight", "W4A4"),
     f"tensor '{K_PROJ}.weight' has unknown quant type 'W4A4'"),
    (None, lambda d: d.__setitem__("model_quant_type", "W3A8"), "unknown model_quant_type 'W3A8'"),
], ids=["missing-tensor", "listed-not-stored", "required-not-listed", "deq-int32", "deq-fp16",
        "float-weight", "float-quant-bias", "int-weight-scale", "int8-in-float-layer", "input-scale-shape",
        "weight-scale-shape", "deq-scale-shape", "weight-shape", "unknown-tensor-type", "unknown-model-type"])
def test_broken_w8a8_checkpoint_fails_naming_the_tensor(w8a8_dir, tmp_path, edit_tensors,
                                                        edit_description, message):
    broken = _broken(w8a8_dir, tmp_path / "broken", edit_tensors, edit_description)
    with pytest.raises(ValueError, match=message):
        _load(broken)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_deq_scale_of_the_other_dtype_is_re_encoded_by_value(w8a8_dir, tmp_path, dtype):
    """msModelSlim writes int64 float-bits for fp16 and float32 for bf16 models. The other one of
    the two is converted by value (ATB converts fp32 -> int64 the same way); never by a numeric
    cast, which would turn float bits 0x3C23D70A into 1.0e9 or a float 0.01 into int64 0."""
    stored = "float32" if dtype == "float16" else "int64"
    values = {}

    def to_other(tensors: dict[str, torch.Tensor]) -> None:
        for name in [n for n in tensors if n.endswith(".deq_scale")]:
            values[name] = decode_deq_scale(tensors[name])
            tensors[name] = values[name] if stored == "float32" else encode_deq_scale_int64(values[name])

    broken = _broken(w8a8_dir, tmp_path / stored, to_other)
    qkv = _load(broken, dtype=dtype).llm_engine.model_runner.model.model.layers[0].self_attn.qkv_proj
    assert qkv.deq_scale.dtype == (torch.int64 if dtype == "float16" else torch.float32)
    want = torch.cat([values[f"model.layers.0.self_attn.{s}_proj.deq_scale"] for s in "qkv"])
    assert torch.equal(decode_deq_scale(qkv.deq_scale.data), want)
    assert 1e-6 < float(want.min()) and float(want.max()) < 1.0          # real scales, not bit patterns


@pytest.mark.parametrize("name", ["int3", "W8A8_static", "awq"])
def test_unknown_quantization_name_lists_known_methods(tiny_llama_dir, name):
    with pytest.raises(ValueError, match=f"quantization: unknown method '{name}'; known methods: wint8, "):
        _load(tiny_llama_dir, quantization=name)


@pytest.fixture(scope="module")
def wint2_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wint2_good")
    write_wint2_checkpoint(tiny_llama_dir, out)                # MLP in WINT2, attention wint8
    return out


def _wint2_copy(wint2_dir: Path, out: Path, edit_config: Callable[[dict], None] | None = None,
                edit_tensors: Edit | None = None) -> Path:
    shutil.copytree(wint2_dir, out)
    if edit_config is not None:
        config = json.loads((out / "config.json").read_text())
        edit_config(config["quantization_config"])
        (out / "config.json").write_text(json.dumps(config))
    if edit_tensors is not None:
        tensors = load_file(str(out / "model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, str(out / "model.safetensors"))
    return out


def _moe_ranges(w4: tuple[int, int], w2: tuple[int, int]) -> Callable[[dict], None]:
    ranges = {"moe_w4_quant_config": {"quant_type": "wint4", "quant_start_layer": w4[0], "quant_end_layer": w4[1]},
              "moe_w2_quant_config": {"quant_type": "wint2", "quant_start_layer": w2[0], "quant_end_layer": w2[1]}}
    return lambda qc: qc.__setitem__("moe_quant_config", ranges)


def test_wint2_layer_ranges_must_cover_the_model(wint2_dir, tmp_path):
    covered = _wint2_copy(wint2_dir, tmp_path / "covered", _moe_ranges((0, 0), (1, 5)))
    assert _load(covered).llm_engine.model_runner.model is not None          # 2 layers: 0 and 1
    gap = _wint2_copy(wint2_dir, tmp_path / "gap", _moe_ranges((0, 0), (3, 5)))
    with pytest.raises(ValueError, match=r"config.json: moe_quant_config layer ranges \[\('wint4', 0, 0\), "
                                         r"\('wint2', 3, 5\)\] do not cover layer 1 of the model's 2"):
        _load(gap)


@pytest.mark.parametrize("edit_tensors, message", [
    (_set(f"{DOWN}.quant_weight", lambda v: v.to(torch.int32)),
     f"{DOWN}.quant_weight: checkpoint tensor has dtype torch.int32, expected torch.uint8"),
    (_set(f"{DOWN}.code_scale", lambda v: v.to(torch.int32)),
     f"{DOWN}.code_scale: expected a floating-point tensor, got torch.int32"),
    (_set(f"{DOWN}.super_scales", lambda v: v[:-1].clone()), f"{DOWN}.super_scales"),
], ids=["quant-weight-dtype", "code-scale-dtype", "super-scales-shape"])
def test_broken_wint2_tensors_are_named(wint2_dir, tmp_path, edit_tensors, message):
    with pytest.raises(ValueError, match=message):
        _load(_wint2_copy(wint2_dir, tmp_path / "broken", edit_tensors=edit_tensors))
