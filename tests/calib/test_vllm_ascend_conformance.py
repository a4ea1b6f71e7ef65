"""Our `python -m calib` output, walked through the lookups vllm-ascend performs when it loads an
msModelSlim checkpoint, so an export that would fail there (KeyError, unknown scheme, dtype or
shape mismatch, a tensor vLLM drops) fails here first.

The expectations below are data written from vllm-ascend's source (github vllm-project/vllm-ascend,
HEAD 182b75e); each entry names the file and function it comes from. Nothing here imports
vllm-ascend: it needs torch_npu. Paths are inside that repository unless they say otherwise.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from ascend_llm import LLM, SamplingParams
from calib.cli import main as calib_main
from calib.export import VLLM_ASCEND_FP8_TYPE
from tests.calib.test_mixed_format import heavy_model_dir  # noqa: F401  (fixture)
from tests.shared_data import CALIB_PROSE

# ---------------------------------------------------------------------------------------------
# vllm-ascend's expectations, as data
# ---------------------------------------------------------------------------------------------

# Linear schemes by description type: vllm_ascend/quantization/methods/registry.py `register_scheme`
# (keys (quant_type, "linear")) as registered in methods/w8a8_static.py ("W8A8"), w8a8_dynamic.py
# ("W8A8_DYNAMIC"), w8a16.py ("W8A16"), w8a8_pdmix.py ("W8A8_MIX"), w8a8fp8_dynamic.py
# ("W8A8FP8_DYNAMIC"; there is no "WFP8AFP8_DYNAMIC", msModelSlim's name for it), and the 4-bit /
# MX ones we never write. "FLOAT" is the skip marker of modelslim_config.py `is_layer_skipped_ascend`.
LINEAR_SCHEMES = frozenset({"W8A8", "W8A8_DYNAMIC", "W8A16", "W8A8_MIX", "W8A8FP8_DYNAMIC",
                            "W8A8_MXFP8", "W4A4_DYNAMIC", "W4A4_FLATQUANT_DYNAMIC", "W4A4_MXFP4",
                            "W4A4_MXFP4_FLATQUANT", "W4A8_MXFP"})
# Description values vllm-ascend accepts at all: the linear schemes, FLOAT, and "C8" for the KV
# scales (modelslim_config.py `_add_kvcache_quant_metadata` reads kv_cache_type == "C8").
KNOWN_VALUES = LINEAR_SCHEMES | {"FLOAT", "C8"}

# How a checkpoint tensor must match the parameter vLLM creates (its weight loaders copy_ by value):
#   "exact"    - same dtype (int8 / int32 values, int64 float-bits, e4m3: a cast corrupts them)
#   "float"    - any floating dtype (a float-to-float cast keeps the value)
#   "integral" - the parameter is int8: a float tensor is accepted if it holds integers in int8 range
PARAMS_DTYPE = "params_dtype"          # the model dtype vLLM serves with


@dataclass(frozen=True)
class Param:
    name: str
    dtype: object                       # torch dtype, PARAMS_DTYPE, or a callable(params_dtype)
    shape: str                          # "n,k" | "n" | "n,1" | "1"
    match: str                          # "exact" | "float" | "integral"
    required: bool = True              # False: msModelSlim's saver does not write it either


def _deq_scale_dtype(params_dtype: torch.dtype) -> torch.dtype:
    # w8a8_static.py get_perchannel_param: float32 for bf16, int64 for fp16
    return torch.float32 if params_dtype == torch.bfloat16 else torch.int64


# AscendLinearMethod.create_weights (quantization/method_adapters.py) registers what the scheme's
# get_weight / get_pertensor_param / get_perchannel_param return:
SCHEME_PARAMS: dict[str, tuple[Param, ...]] = {
    # methods/w8a8_static.py AscendW8A8LinearMethod
    "W8A8": (Param("weight", torch.int8, "n,k", "exact"),                       # get_weight
             Param("input_scale", PARAMS_DTYPE, "1", "float"),                   # get_pertensor_param
             Param("input_offset", torch.int8, "1", "integral"),                 # get_pertensor_param
             Param("quant_bias", torch.int32, "n", "exact"),                     # get_perchannel_param
             Param("deq_scale", _deq_scale_dtype, "n", "exact"),                 # get_perchannel_param
             # get_perchannel_param also declares these; unused by apply and not written by
             # msModelSlim's v1 `on_w8a8_static` (method_adapters.py get_computed_params lists them)
             Param("weight_scale", PARAMS_DTYPE, "n,1", "float", required=False),
             Param("weight_offset", PARAMS_DTYPE, "n,1", "float", required=False)),
    # methods/w8a8_dynamic.py AscendW8A8DynamicLinearMethod get_weight / get_perchannel_param
    "W8A8_DYNAMIC": (Param("weight", torch.int8, "n,k", "exact"),
                     Param("weight_scale", PARAMS_DTYPE, "n,1", "float"),
                     Param("weight_offset", PARAMS_DTYPE, "n,1", "float")),
    # methods/w8a16.py AscendW8A16LinearMethod get_weight / get_perchannel_param
    "W8A16": (Param("weight", torch.int8, "n,k", "exact"),
              Param("weight_scale", PARAMS_DTYPE, "n,1", "float"),
              Param("weight_offset", PARAMS_DTYPE, "n,1", "float")),
    # methods/w8a8fp8_dynamic.py AscendW8A8FP8DynamicLinearMethod get_weight / get_perchannel_param
    # (weight_offset: process_weights_after_loading of the W8A8_DYNAMIC parent flattens it)
    "W8A8FP8_DYNAMIC": (Param("weight", torch.float8_e4m3fn, "n,k", "exact"),
                        Param("weight_scale", torch.float32, "n,1", "float"),
                        Param("weight_offset", PARAMS_DTYPE, "n,1", "float")),
}

# Fused layers: vLLM's LlamaForCausalLM / Qwen2ForCausalLM `packed_modules_mapping` (vllm
# model_executor/models/llama.py, qwen2.py), the same lists as vllm-ascend's
# modelslim_config.py `packed_modules_model_mapping` entries. modelslim_config.py
# `get_linear_quant_type` raises ValueError unless every shard has one type, and
# `is_layer_skipped_ascend` unless all or none are FLOAT.
PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
# vLLM layer prefixes of a Llama / Qwen2 decoder layer that get a quant method (LinearBase).
LAYER_LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
# VocabParallelEmbedding / ParallelLMHead also go through get_quant_method (modelslim_config.py,
# the `isinstance(layer, VocabParallelEmbedding)` branch): `is_layer_skipped_ascend(prefix)` scans
# for a FLOAT `<prefix>*.weight` key, else `create_scheme_for_layer` does
# quant_description[prefix + ".weight"] -> KeyError 'lm_head.weight' when it is absent. vLLM
# builds lm_head for tied-embedding models too (then ties it), so the key is needed either way.
EMBEDDINGS = ("model.embed_tokens", "lm_head")

# C8 KV cache (kv_cache_type == "C8"): modelslim_config.py `_add_kvcache_quant_metadata` takes the
# C8 layer ids from keys containing "k_proj.kv_cache_scale"; `get_cache_scale_mapper` renames
# these four suffixes to `.attn.k_cache_scale` etc.; kv_c8.py `_c8_kv_scale_weight_loader`
# squeezes them; attention/attention_v1.py `AscendC8AttentionBackendImpl._prepare_c8_scales`
# views each as [1, kv_heads, head_dim] (or a single value). The decode path
# (`_forward_c8_decode`, `_dequant_paged_kv_to_dense` "scale-only dequant") passes the scale
# alone while `_quantize_kv_to_int8` adds the offset: only offset 0 round-trips.
C8_SUFFIXES = ("k_proj.kv_cache_scale", "k_proj.kv_cache_offset",
               "v_proj.kv_cache_scale", "v_proj.kv_cache_offset")
# An anti-outlier norm bias is loaded when any "norm.bias" key exists (vllm_ascend/ops/layernorm.py
# AscendRMSNorm.__init__); a Linear `.bias` is loaded only if the architecture declares the
# parameter (vLLM's Llama / Qwen2 `load_weights` skip a `.bias` with no parameter).
META_KEYS = {"model_quant_type", "version", "group_size", "kv_cache_type", "kv_quant_type",
             "fa_quant_type", "reduce_quant_type", "metadata", "optional"}


def _shape(spec: str, n: int, k: int) -> tuple[int, ...]:
    return {"n,k": (n, k), "n": (n,), "n,1": (n, 1), "1": (1,)}[spec]


def _dtype(spec: object, params_dtype: torch.dtype) -> torch.dtype:
    if spec == PARAMS_DTYPE:
        return params_dtype
    return spec(params_dtype) if callable(spec) else spec


def _loads(param: Param, tensor: torch.Tensor, params_dtype: torch.dtype) -> str | None:
    """None if vLLM's copy_ of `tensor` into the parameter keeps its values, else why not."""
    want = _dtype(param.dtype, params_dtype)
    if param.match == "exact" and tensor.dtype != want:
        return f"dtype {tensor.dtype}, vllm-ascend creates {want}"
    if param.match == "float" and not tensor.is_floating_point():
        return f"dtype {tensor.dtype}, vllm-ascend creates float {want}"
    if param.match == "integral":
        t = tensor.double()
        if not bool((t == t.round()).all() and (t >= -128).all() and (t <= 127).all()):
            return "values are not int8 integers"
    return None


def vllm_ascend_problems(out: Path, params_dtype: torch.dtype) -> list[str]:
    """Every lookup of vllm-ascend's ModelSlim loading path that our checkpoint in `out` fails."""
    desc = json.loads((out / "quant_model_description.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(out.glob("quant_model_weights*.safetensors")):
        tensors.update(load_file(str(path)))
    config = AutoConfig.from_pretrained(out)
    problems: list[str] = []
    if "online_hadamard" in desc:
        # modelslim_config.py reads per-tensor types only: an unknown top-level key is skipped, so
        # the listed layers would run without their online rotation (vllm-ascend HEAD 182b75e has
        # no online Hadamard for W8A8; its QuaRot W4A4 PR #8401 is unmerged)
        problems.append(f"online_hadamard: ignored by vllm-ascend; {len(desc['online_hadamard']['layers'])} "
                        f"layers would run unrotated (wrong outputs)")
    entries = {k: v for k, v in desc.items() if k not in META_KEYS and k != "online_hadamard"}
    problems += [f"{k}: unknown type {v!r}" for k, v in entries.items() if v not in KNOWN_VALUES]
    problems += [f"{k}: described but not in the weights" for k in entries if k not in tensors]

    def check_linear(prefix: str, shards: tuple[str, ...], n_k: dict[str, tuple[int, int]]) -> None:
        keys = [f"{s}.weight" for s in shards]
        missing = [k for k in keys if k not in desc]
        if missing:
            problems.append(f"{prefix}: KeyError {missing[0]!r}")
            return
        types = {desc[k] for k in keys}
        if len(types) != 1:
            problems.append(f"{prefix}: shards have different types {sorted(types)}")
            return
        quant_type = types.pop()
        if quant_type == "FLOAT":
            return
        if quant_type not in SCHEME_PARAMS:
            problems.append(f"{prefix}: no vllm-ascend linear scheme for {quant_type!r}")
            return
        for shard in shards:
            n, k = n_k[shard]
            for param in SCHEME_PARAMS[quant_type]:
                name = f"{shard}.{param.name}"
                if name not in tensors:
                    if param.required:
                        problems.append(f"{name}: missing ({quant_type})")
                    continue
                if tuple(tensors[name].shape) != _shape(param.shape, n, k):
                    problems.append(f"{name}: shape {tuple(tensors[name].shape)}, expected "
                                    f"{_shape(param.shape, n, k)}")
                why = _loads(param, tensors[name], params_dtype)
                if why:
                    problems.append(f"{name}: {why}")

    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(config)
    modules = dict(hf.named_modules())
    declared = {name for name, _ in hf.named_parameters() if name.endswith(".bias")}
    for layer in range(config.num_hidden_layers):
        for linear in LAYER_LINEARS:
            prefix = f"model.layers.{layer}.{linear}"
            parent, _, leaf = prefix.rpartition(".")
            shards = tuple(f"{parent}.{s}" for s in PACKED.get(leaf, (leaf,)))
            n_k = {s: tuple(modules[s].weight.shape) for s in shards}
            check_linear(prefix, shards, n_k)
    for prefix in EMBEDDINGS:
        if desc.get(f"{prefix}.weight") != "FLOAT":
            problems.append(f"{prefix}: needs '{prefix}.weight': 'FLOAT' in the description")
    for name in tensors:                 # static W8A8 carries its bias in quant_bias as well
        module = name.rpartition(".")[0]
        if (name.endswith(".bias") and "norm" not in module.rpartition(".")[2]
                and name not in declared and desc.get(f"{module}.weight") != "W8A8"):
            problems.append(f"{name}: vLLM builds the layer without a bias and drops it")
    if desc.get("kv_cache_type") == "C8":
        heads = config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        layers = {int(k.split(".")[2]) for k in desc if k.endswith("k_proj.kv_cache_scale")}
        if layers != set(range(config.num_hidden_layers)):
            problems.append(f"C8 scales for layers {sorted(layers)} only")
        for layer in layers:
            for suffix in C8_SUFFIXES:
                name = f"model.layers.{layer}.self_attn.{suffix}"
                t = tensors.get(name)
                if t is None:
                    problems.append(f"{name}: missing")
                elif t.numel() not in (1, heads * head_dim) or not t.is_floating_point():
                    problems.append(f"{name}: {t.dtype} {tuple(t.shape)}, expected float "
                                    f"[{heads * head_dim}]")
                elif suffix.endswith("offset") and bool((t != 0).any()):
                    problems.append(f"{name}: non-zero offset, ignored by vllm-ascend's C8 decode")
    elif any(k.endswith(C8_SUFFIXES) for k in desc):
        problems.append("C8 scales without kv_cache_type 'C8': vllm-ascend ignores them")
    return problems


# ---------------------------------------------------------------------------------------------
# Checkpoints calibrated with `python -m calib`
# ---------------------------------------------------------------------------------------------

def calibrate(model_dir: Path, out: Path, *flags: str) -> Path:
    code = calib_main(["--model_path", str(model_dir), "--save_directory", str(out),
                       "--calib_file", str(CALIB_PROSE), "--num_samples", "2", "--max_tokens", "32",
                       "--no_progress", "--quiet", *flags])
    assert code == 0
    return out


def copy_model(source: Path, dest: Path, dtype: str | None = None) -> Path:
    dest.mkdir()
    for f in source.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    if dtype:
        config = json.loads((dest / "config.json").read_text())
        config["dtype"] = config["torch_dtype"] = dtype
        (dest / "config.json").write_text(json.dumps(config))
    return dest


@pytest.fixture(scope="module")
def tied_bf16_c8(tiny_qwen2_tied_dir, tmp_path_factory):
    """Tied embeddings (like SmolLM2 / Llama-3.2-1B), Qwen2 q/k/v biases, bf16 source, static W8A8
    with C8 and one float fall-back."""
    root = tmp_path_factory.mktemp("conf_tied")
    source = copy_model(Path(tiny_qwen2_tied_dir), root / "src", "bfloat16")
    return calibrate(source, root / "out", "--use_kvcache_quant", "True",
                     "--disable_names", "model.layers.1.mlp.down_proj")


def test_tied_bf16_static_c8_passes_every_lookup(tied_bf16_c8):
    assert vllm_ascend_problems(tied_bf16_c8, torch.bfloat16) == []
    desc = json.loads((tied_bf16_c8 / "quant_model_description.json").read_text())
    tensors = load_file(str(tied_bf16_c8 / "quant_model_weights.safetensors"))
    assert desc["kv_cache_type"] == desc["kv_quant_type"] == "C8"
    assert desc["model_quant_type"] == "W8A8"
    assert desc["lm_head.weight"] == "FLOAT"
    assert torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])
    assert tensors["lm_head.weight"].dtype == torch.bfloat16
    for proj in ("q_proj", "k_proj", "v_proj"):             # quantized Linears' biases: float32
        assert tensors[f"model.layers.0.self_attn.{proj}.bias"].dtype == torch.float32
    assert desc["model.layers.1.mlp.down_proj.weight"] == "FLOAT"


def test_our_runtime_loads_the_tied_checkpoint_with_its_explicit_lm_head(tied_bf16_c8):
    llm = LLM(str(tied_bf16_c8), max_model_len=64, enforce_eager=True)
    model = llm.llm_engine.model_runner.model
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    out = llm.generate(prompt_token_ids=[[5, 17, 33, 8]], sampling_params=params, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


def test_tied_float32_source_writes_a_separate_lm_head(tiny_qwen2_tied_dir, tmp_path):
    """A float32 model's tied head shares the embedding's storage, which safetensors refuses to
    write twice: the export copies it."""
    out = calibrate(Path(tiny_qwen2_tied_dir), tmp_path / "out", "--is_dynamic", "True")
    assert vllm_ascend_problems(out, torch.float16) == []
    tensors = load_file(str(out / "quant_model_weights.safetensors"))
    assert torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])
    llm = LLM(str(out), max_model_len=64, enforce_eager=True)
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    assert len(llm.generate(prompt_token_ids=[[5, 17, 33]], sampling_params=params,
                            use_tqdm=False)[0].outputs[0].token_ids) == 2


@pytest.mark.parametrize("flags,quant_type", [(("--is_dynamic", "True"), "W8A8_DYNAMIC"),
                                              (("--a_bit", "16"), "W8A16")])
def test_llama_dynamic_and_weight_only_pass_every_lookup(tiny_llama_dir, tmp_path, flags, quant_type):
    out = calibrate(Path(tiny_llama_dir), tmp_path / "out", *flags)
    assert vllm_ascend_problems(out, torch.float16) == []
    assert json.loads((out / "quant_model_description.json").read_text())["model_quant_type"] == quant_type


def test_m2_on_dynamic_layers_warns_that_vllm_drops_the_added_biases(tiny_llama_dir, tmp_path, caplog):
    """m2 shifts add Linear biases Llama has no parameter for; vLLM drops them silently, so the
    export warns (the walk finds exactly those biases)."""
    with caplog.at_level(logging.WARNING, logger="calib.export"):
        out = calibrate(Path(tiny_llama_dir), tmp_path / "out", "--is_dynamic", "True",
                        "--anti_method", "m2")
    problems = vllm_ascend_problems(out, torch.float16)
    assert problems and all("drops it" in p for p in problems)
    assert any(p.startswith("model.layers.0.self_attn.q_proj.bias") for p in problems)
    assert any("drop such biases" in r.getMessage() for r in caplog.records)


def test_the_walk_flags_an_online_rotation(tiny_llama_dir, tmp_path, caplog):
    """--rotation hadamard checkpoints run in ascend-llm only: the export warns, the walk finds
    exactly the rotation (every tensor lookup still passes)."""
    with caplog.at_level(logging.WARNING, logger="calib.export"):
        out = calibrate(Path(tiny_llama_dir), tmp_path / "out", "--rotation", "hadamard")
    assert vllm_ascend_problems(out, torch.float16) == [
        "online_hadamard: ignored by vllm-ascend; 2 layers would run unrotated (wrong outputs)"]
    assert any("online Hadamard" in r.getMessage() and "ascend-llm only" in r.getMessage() for r in caplog.records)


def test_m2_on_static_layers_needs_no_warning(tiny_llama_dir, tmp_path, caplog):
    """Static W8A8 folds the shift's bias into quant_bias, so vLLM dropping `.bias` is harmless."""
    with caplog.at_level(logging.WARNING, logger="calib.export"):
        calibrate(Path(tiny_llama_dir), tmp_path / "out", "--anti_method", "m2")
    assert not any("drop such biases" in r.getMessage() for r in caplog.records)


def test_fp8_layers_under_vllm_ascends_name_pass_every_lookup(heavy_model_dir, tmp_path):  # noqa: F811
    """MoFQ's FP8 layers are written as W8A8FP8_DYNAMIC with a zero weight_offset, and
    msModelSlim's priority names the model after them."""
    out = calibrate(Path(heavy_model_dir), tmp_path / "out", "--mixed_format", "True")
    desc = json.loads((out / "quant_model_description.json").read_text())
    assert desc["model.layers.0.mlp.down_proj.weight"] == VLLM_ASCEND_FP8_TYPE
    assert desc["model_quant_type"] == VLLM_ASCEND_FP8_TYPE
    assert "WFP8AFP8_DYNAMIC" not in desc.values()
    assert vllm_ascend_problems(out, torch.bfloat16) == []


def test_the_walk_catches_what_vllm_ascend_rejects(tied_bf16_c8, tmp_path):
    """Each earlier export defect, put back into a copy of a good checkpoint, is reported."""
    out = copy_model(tied_bf16_c8, tmp_path / "bad")
    desc = json.loads((out / "quant_model_description.json").read_text())
    tensors = load_file(str(out / "quant_model_weights.safetensors"))
    del desc["lm_head.weight"], tensors["lm_head.weight"]                         # tied head dropped
    desc["model.layers.0.self_attn.k_proj.weight"] = "W8A8_DYNAMIC"                # fused mismatch
    desc["model.layers.0.mlp.up_proj.weight"] = "WFP8AFP8_DYNAMIC"
    desc["model.layers.0.mlp.gate_proj.weight"] = "WFP8AFP8_DYNAMIC"               # unknown scheme
    offset = "model.layers.1.self_attn.v_proj.kv_cache_offset"
    tensors[offset] = tensors[offset] + 3                                          # asymmetric C8
    deq = "model.layers.1.self_attn.o_proj.deq_scale"
    tensors[deq] = tensors[deq].view(torch.int32).to(torch.int64)                   # int64 for bf16
    from safetensors.torch import save_file
    save_file(tensors, str(out / "quant_model_weights.safetensors"))
    (out / "quant_model_description.json").write_text(json.dumps(desc))
    problems = "\n".join(vllm_ascend_problems(out, torch.bfloat16))
    for expected in ("lm_head: needs 'lm_head.weight'", "self_attn.qkv_proj: shards have different types",
                     "unknown type 'WFP8AFP8_DYNAMIC'", "mlp.gate_up_proj: no vllm-ascend linear scheme",
                     f"{offset}: non-zero offset", f"{deq}: dtype torch.int64"):
        assert expected in problems, problems
