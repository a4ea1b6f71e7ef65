"""compressed-tensors checkpoints written by llm-compressor itself (tests/fixtures/peer_checkpoints/
llmcompressor/, made by scripts/make_peer_fixtures_llmcompressor.sh; see each MANIFEST.json),
loaded from config.json's `quantization_config` alone, against transformers' logits of the same
saved checkpoint (compressed-tensors decompresses it and fake-quantizes the activations, and K / V
with a kv_cache_scheme).

Tolerances, |ours - reference| over the [2, 8, 128] fp32 logits (logit std ~0.63):
- GPTQ with actorder 'weight' (llm-compressor 0.14's act-order: no weight_g_idx);
- FP8_DYNAMIC, FP8_BLOCK (128 x 128 weight blocks, per-token-group activations; this fixture's
  model is 128 / 256 wide so that a group fits), W8A8 int8 static (symmetric channel weights; asymmetric activations with
  per-tensor weights and Qwen2 biases), W4A16 / W4A16 asym / W8A16 (pack-quantized, group 32): the same
  codes, scales and activation rounding on both sides (e4m3 casts and int rounding are exact), so
  only fp32 summation order differs: measured max 1.3e-6, bound 1e-4.
- W8A8 int8 dynamic: our per-token activation scale is amax / 127 (range +-127, what
  `npu_dynamic_quant` computes), compressed-tensors' is amax / 127.5 over [-128, 127]: every
  activation lands on a different int8 grid, an independent rounding as large as the format's
  own (reference vs float: max 0.037). Measured max 0.042 / mean 0.009, bound 0.1 / 0.02.
- FP8 (per-tensor static): q/k/v and gate/up each carry their own weight scale (e.g. 6.08e-4,
  6.02e-4, 6.33e-4); as vLLM, fused shards below the max scale are re-quantized to it (one more
  e4m3 rounding of those rows, `fp8_checkpoint.requantize_with_max_scale`). Measured max 0.14 /
  mean 0.027 (reference vs float: max 0.20), bound 0.3 / 0.05; the unfused o_proj / down_proj
  keep the checkpoint's e4m3 bytes exactly (asserted).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ascend_llm.engine.kv_cache import KVCacheSpec, allocate_kv_caches
from ascend_llm.loader import iter_safetensors_weights, load_hf_config
from ascend_llm.models.forward_batch import ForwardBatch
from ascend_llm.models.registry import get_model_class
from ascend_llm.models.weight_utils import process_weights_after_loading
from ascend_llm.ops import AttentionMetadata, build_op_set
from ascend_llm.quant.compressed_tensors import CompressedTensorsConfig
from ascend_llm.quant.registry import get_quant_config
from ascend_llm.quant.weight_only_group import unpack_int32

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "peer_checkpoints" / "llmcompressor"
EXACT = (1e-4, 1e-4)                   # (max, mean) bounds
CASES = {   # case -> (method class of qkv_proj, (max, mean) bound)
    "llama_w8a8_int8_dynamic": ("CtW8A8DynamicMethod", (0.1, 0.02)),
    "qwen2_w8a8_int8_dynamic": ("CtW8A8DynamicMethod", (0.1, 0.02)),
    "llama_w8a8_int8_static": ("CtW8A8StaticMethod", EXACT),
    "qwen2_w8a8_int8_static_asym": ("CtW8A8StaticMethod", EXACT),
    "llama_fp8": ("Fp8CheckpointLinearMethod", (0.3, 0.05)),
    "llama_fp8_dynamic": ("CtFp8ChannelDynamicMethod", EXACT),
    "llama_fp8_block": ("CtFp8BlockMethod", EXACT),
    "llama_w4a16_g32": ("GroupWeightOnlyLinearMethod", EXACT),
    "llama_w4a16_g32_asym": ("GroupWeightOnlyLinearMethod", EXACT),
    "llama_w4a16_g32_actorder_weight": ("GroupWeightOnlyLinearMethod", EXACT),
    "llama_w8a16_g32": ("GroupWeightOnlyLinearMethod", EXACT),
    "qwen2_w4a16_g32": ("GroupWeightOnlyLinearMethod", EXACT),
}
BLOCK = 4


def build(model_dir: Path, dtype: torch.dtype = torch.float32):
    """Load as the engine does: the format from config.json, weights, then process."""
    config = load_hf_config(model_dir)
    quant = get_quant_config(None, config, model_dir)
    model = get_model_class(config)(config, build_op_set("cpu"), quant, dtype)
    model.load_weights(iter_safetensors_weights(model_dir))
    process_weights_after_loading(model)
    return config, model.eval()


@torch.inference_mode()
def logits(model, config, token_ids: list[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One prefill of `token_ids` -> [T, vocab]."""
    n, num_blocks = len(token_ids), 8
    kv = allocate_kv_caches(KVCacheSpec.from_hf_config(config, BLOCK, dtype), num_blocks, torch.device("cpu"))
    table = list(range(-(-n // BLOCK)))
    slots = [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(n)]
    meta = AttentionMetadata.build([n], [n], [table], slots, BLOCK, num_blocks, torch.device("cpu"))
    batch = ForwardBatch(torch.tensor(token_ids), torch.arange(n), meta, kv, torch.arange(n))
    return model.compute_logits(model(batch)).float()


@pytest.mark.parametrize("case", sorted(CASES))
def test_fixture_matches_transformers(case):
    model_dir = FIXTURES / case
    manifest = json.loads((model_dir / "MANIFEST.json").read_text())
    assert manifest["tool"] == "llmcompressor" and manifest["compressed_tensors_version"]
    config, model = build(model_dir)
    method, (max_bound, mean_bound) = CASES[case]
    assert type(model.model.layers[0].self_attn.qkv_proj.quant_method).__name__ == method
    assert type(model.model.layers[1].mlp.down_proj.quant_method).__name__ == method
    ref = load_file(str(model_dir / "reference.safetensors"))
    got = torch.stack([logits(model, config, row.tolist()) for row in ref["input_ids"]])
    want = ref["logits"]
    err = (got - want).abs()
    assert float(err.max()) < max_bound and float(err.mean()) < mean_bound, (err.max(), err.mean())
    assert want.std() > 0.1                                       # not near-constant logits
    assert float((want - ref["float_logits"]).abs().max()) > 1e-2   # the checkpoint is quantized


@pytest.mark.parametrize("case", ["qwen2_w8a8_int8_static_asym", "llama_w4a16_g32_asym", "llama_fp8"])
def test_bf16_model(case):
    """Hub checkpoints are mostly bf16 models: the same tensors run in bf16 (deq_scale as float32,
    scales cast), within bf16 rounding of the fp32 reference (measured max 0.06 / 0.02 / 0.21)."""
    config, model = build(FIXTURES / case, torch.bfloat16)
    ref = load_file(str(FIXTURES / case / "reference.safetensors"))
    got = torch.stack([logits(model, config, row.tolist(), torch.bfloat16) for row in ref["input_ids"]])
    err = (got - ref["logits"]).abs()
    assert float(err.max()) < 0.4 and float(err.mean()) < 0.06, (err.max(), err.mean())


def test_fp8_unfused_layers_keep_checkpoint_bytes():
    _, model = build(FIXTURES / "llama_fp8")
    tensors = load_file(str(FIXTURES / "llama_fp8" / "model.safetensors"))
    o_proj = model.model.layers[0].self_attn.o_proj
    name = "model.layers.0.self_attn.o_proj"
    assert torch.equal(o_proj.weight.data.view(torch.uint8), tensors[f"{name}.weight"].view(torch.uint8))
    assert float(o_proj.weight_scale) == float(tensors[f"{name}.weight_scale"])


def _llm_logprob_errors(tmp_path, case: str, **kwargs) -> torch.Tensor:
    """|LLM prompt logprobs - the reference's| for the fixture's prompts (engine path, auto-detected)."""
    from ascend_llm import LLM, SamplingParams
    from tests.tiny_models import make_tokenizer
    model_dir = tmp_path / case
    shutil.copytree(FIXTURES / case, model_dir)
    make_tokenizer().save_pretrained(model_dir)
    ref = load_file(str(model_dir / "reference.safetensors"))
    llm = LLM(str(model_dir), max_model_len=32, **kwargs)
    prompts = ref["input_ids"].tolist()
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, ignore_eos=True)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    want = torch.log_softmax(ref["logits"], dim=-1)
    errors = []
    for row, (p, out) in enumerate(zip(prompts, outs)):
        got = torch.tensor([entry[t].logprob for t, entry in zip(p[1:], out.prompt_logprobs[1:])])
        errors.append((got - want[row, torch.arange(len(p) - 1), torch.tensor(p[1:])]).abs())
    return torch.cat(errors)


def test_through_llm(tmp_path):
    """The engine detects the format by itself: prompt logprobs equal the reference's."""
    assert float(_llm_logprob_errors(tmp_path, "llama_w4a16_g32").max()) < 1e-4


def test_fp8_kv_cache_scheme(tmp_path):
    """kv_cache_scheme fp8 per-tensor: `self_attn.k_scale` / `v_scale` are the engine's KV scales.
    transformers fake-quantizes K and V with them, so with --kv-cache-dtype fp8 the logprobs match
    exactly (measured 5e-7); with `auto` the scales are unused and the cache stays float (measured
    max 0.075 from the reference: the KV rounding is what differs)."""
    assert float(_llm_logprob_errors(tmp_path, "llama_fp8_dynamic_kv_fp8", kv_cache_dtype="fp8").max()) < 1e-4
    unused = _llm_logprob_errors(tmp_path / "auto", "llama_fp8_dynamic_kv_fp8")
    assert 1e-3 < float(unused.max()) < 0.3


def test_unpack_int32_layout():
    # compressed-tensors' pack_to_int32 (src/compressed_tensors/compressors/quantized_compressors/
    # pack_quantized.py): codes + 2^(bits-1) as unsigned, 32 / bits per int32 along the row,
    # least significant bits first, the last word zero-padded; zero points the same along dim 0.
    codes = torch.tensor([[-8, -1, 0, 7, 3, -4, 5, -6, 1, 2]], dtype=torch.int8)   # 10 -> 2 words
    unsigned = (codes.to(torch.int64) + 8).tolist()[0] + [0] * 6
    words = [sum(v << (4 * i) for i, v in enumerate(unsigned[j:j + 8])) for j in (0, 8)]
    packed = torch.tensor([[w - (1 << 32) if w >= 1 << 31 else w for w in words]], dtype=torch.int32)
    assert torch.equal(unpack_int32(packed, 4, 10), codes)
    assert torch.equal(unpack_int32(packed.t().contiguous(), 4, 10, dim=0), codes.t())
    eight = torch.tensor([[-128, 127, 0, -1, 5]], dtype=torch.int8)                # 4 per word
    u8 = (eight.to(torch.int64) + 128).tolist()[0] + [0] * 3
    w8 = [sum(v << (8 * i) for i, v in enumerate(u8[j:j + 4])) for j in (0, 4)]
    packed8 = torch.tensor([[w - (1 << 32) if w >= 1 << 31 else w for w in w8]], dtype=torch.int32)
    assert torch.equal(unpack_int32(packed8, 8, 5), eight)


def _config(case: str) -> dict:
    return json.loads((FIXTURES / case / "config.json").read_text())["quantization_config"]


def _edit(group: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    for key in parents:
        group = group[key]
    group[last] = value


@pytest.mark.parametrize("case, path, value, match", [
    ("llama_w4a16_g32", "config_groups.group_0.weights.foo", 1, r"weights: unknown field 'foo'"),
    ("llama_w4a16_g32", "config_groups.group_0.bar", 1, r"group_0: unknown field 'bar'"),
    ("llama_w4a16_g32", "baz", 1, r"quantization_config: unknown field 'baz'"),
    ("llama_w4a16_g32", "config_groups.group_0.weights.strategy", "attn_head",
     r"weights.strategy: 'attn_head' is not supported"),
    ("llama_w4a16_g32", "config_groups.group_0.weights.num_bits", 2,
     r"pack-quantized supports static int4 / int8 .*2-bit int"),
    ("llama_w4a16_g32", "config_groups.group_0.weights.group_size", None, r"weights.group_size: strategy 'group'"),
    ("llama_w4a16_g32", "config_groups.group_0.weights.actorder", "group", r"weights.actorder: 'group'"),
    ("llama_w4a16_g32", "config_groups.group_0.format", "marlin-24", r"group_0.format: 'marlin-24'"),
    ("llama_w4a16_g32", "config_groups.group_0.weights.type", "mxfp", r"weights.type: 'mxfp'"),
    ("llama_fp8", "kv_cache_scheme", {"num_bits": 8, "type": "int", "strategy": "tensor"},
     r"kv_cache_scheme: only an fp8 .* per-tensor KV-cache scheme is supported, got \(8-bit int"),
    ("llama_fp8", "kv_cache_scheme", {"num_bits": 8, "type": "float", "strategy": "attn_head"},
     r"kv_cache_scheme.strategy: 'attn_head' is not supported"),
    ("llama_fp8", "ignore", [], r"ignore: the LM head is quantized"),
    ("llama_fp8_dynamic", "config_groups.group_0.input_activations", None,
     r"group_0: fp8 weights without input_activations"),
    ("llama_w8a8_int8_dynamic", "config_groups.group_0.input_activations.strategy", "tensor",
     r"input_activations: int8 .*tensor.*dynamic\) is not supported"),
    ("llama_w8a8_int8_dynamic", "quantization_status", "frozen", r"quantization_status: 'frozen'"),
    ("llama_fp8_block", "config_groups.group_0.weights.block_structure", None,
     r"weights.block_structure: strategy 'block' needs two positive integers, got None"),
    ("llama_fp8_block", "config_groups.group_0.weights.block_structure", [128, 0],
     r"weights.block_structure: .* got \[128, 0\]"),
    ("llama_fp8_dynamic", "config_groups.group_0.weights.block_structure", [128, 128],
     r"weights.block_structure: \[128, 128\] given with strategy 'channel'"),
    ("llama_fp8_block", "config_groups.group_0.input_activations.group_size", 64,
     r"group_0: fp8 weights 'block' with activations .*group_size 64"),
])
def test_config_errors_name_the_field(case, path, value, match):
    config = _config(case)
    _edit(config, path, value)
    with pytest.raises(ValueError, match=match):
        CompressedTensorsConfig.from_config(config, source="config.json")


def test_unknown_quant_method_lists_compressed_tensors(tmp_path):
    """An unknown quant_method still lists the supported ones, compressed-tensors among them."""
    model_dir = tmp_path / "m"
    shutil.copytree(FIXTURES / "llama_w8a16_g32", model_dir)
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["quant_method"] = "awq"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"method 'awq' is not supported.*compressed-tensors"):
        build(model_dir)


@pytest.mark.parametrize("case, tensor, change, match", [
    ("llama_w4a16_g32", "model.layers.0.self_attn.k_proj.weight_scale", "drop",
     r"missing tensor 'model.layers.0.self_attn.k_proj.weight_scale' \(needed by .*qkv_proj\)"),
    ("llama_w4a16_g32", "model.layers.0.mlp.up_proj.weight_shape", "shape",
     r"gate_up_proj.weight_shape\[1\]: weight_shape \[96, 32\] does not match this layer: expected \[n, 64\]"),
    ("llama_w4a16_g32", "model.layers.0.mlp.down_proj.weight_packed", "dtype",
     r"down_proj.weight_packed: checkpoint tensor has dtype torch.int64, expected torch.int32"),
    ("qwen2_w8a8_int8_static_asym", "model.layers.1.self_attn.v_proj.input_zero_point", "range",
     r"qkv_proj.input_zero_point\[v\]: must hold integers in \[-128, 127\], got \[200"),
])
def test_bad_tensors_are_named(tmp_path, case, tensor, change, match):
    model_dir = tmp_path / "m"
    shutil.copytree(FIXTURES / case, model_dir)
    tensors = load_file(str(model_dir / "model.safetensors"))
    if change == "drop":
        del tensors[tensor]
    elif change == "range":
        tensors[tensor] = torch.tensor([200], dtype=torch.int16)
    elif change == "shape":
        tensors[tensor] = torch.tensor([96, 32])
    else:
        tensors[tensor] = tensors[tensor].to(torch.int64)
    save_file(tensors, str(model_dir / "model.safetensors"))
    with pytest.raises(ValueError, match=match):
        build(model_dir)


def _tp_layers(case: str, tp: int):
    """Bare qkv / gate_up / o_proj layers of layer 0 at each TP rank, loaded from the fixture."""
    from ascend_llm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
    packed = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    quant = CompressedTensorsConfig.from_config(_config(case), packed)
    tensors = load_file(str(FIXTURES / case / "model.safetensors"))
    ranks = []
    for rank in range(tp):
        kw = dict(quant_config=quant, tp_rank=rank, tp_size=tp)
        layers = {"self_attn.qkv_proj": QKVParallelLinear(64, 16, 4, 2, prefix="m.self_attn.qkv_proj", **kw),
                  "mlp.gate_up_proj": MergedColumnParallelLinear(64, [96, 96], prefix="m.mlp.gate_up_proj", **kw),
                  "self_attn.o_proj": RowParallelLinear(64, 64, prefix="m.self_attn.o_proj", **kw)}
        shards = {"self_attn.qkv_proj": {"q_proj": "q", "k_proj": "k", "v_proj": "v"},
                  "mlp.gate_up_proj": {"gate_proj": 0, "up_proj": 1}, "self_attn.o_proj": {"o_proj": None}}
        for key, layer in layers.items():
            parent = "model.layers.0." + key.rpartition(".")[0]
            params = dict(layer.named_parameters())
            for module, shard_id in shards[key].items():
                for name, tensor in tensors.items():
                    if name.startswith(f"{parent}.{module}."):
                        param = params[name.rpartition(".")[2]]
                        param.weight_loader(param, tensor, shard_id)
            layer.quant_method.process_weights_after_loading(layer)
        ranks.append(layers)
    return ranks


@pytest.mark.parametrize("case", ["llama_w4a16_g32_asym", "llama_w8a16_g32"])
def test_group_weight_only_tensor_parallel_matches_tp1(case):
    """TP 2 shards of packed codes, group scales and row-packed zero points compute TP 1's result:
    column layers' rank outputs are TP 1's rows of each shard, row-parallel partial sums add up."""
    (full,), ranks = _tp_layers(case, 1), _tp_layers(case, 2)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(3))
    for key, sizes in (("self_attn.qkv_proj", (64, 32, 32)), ("mlp.gate_up_proj", (96, 96))):
        want = full[key].quant_method.apply(full[key], x).split(list(sizes), dim=-1)
        for rank, layers in enumerate(ranks):
            got = layers[key].quant_method.apply(layers[key], x).split([s // 2 for s in sizes], dim=-1)
            for g, w, s in zip(got, want, sizes):
                torch.testing.assert_close(g, w[:, rank * s // 2:(rank + 1) * s // 2], rtol=0, atol=1e-5)
    row = "self_attn.o_proj"
    total = sum(layers[row].quant_method.apply(layers[row], x[:, 32 * r:32 * (r + 1)])
                for r, layers in enumerate(ranks))
    torch.testing.assert_close(total, full[row].quant_method.apply(full[row], x), rtol=0, atol=1e-5)


def test_group_weight_only_refuses_groups_split_by_tensor_parallel():
    from ascend_llm.layers.linear import RowParallelLinear
    quant = CompressedTensorsConfig.from_config(_config("llama_w4a16_g32"))
    with pytest.raises(ValueError, match=r"down_proj: input size per rank 48 must be a multiple of the group size 32"):
        RowParallelLinear(96, 64, prefix="m.down_proj", quant_config=quant, tp_rank=0, tp_size=2)


def test_named_method(tmp_path):
    """`--quantization compressed-tensors` (vLLM's name) loads such a checkpoint and nothing else;
    an online method on one is refused."""
    model_dir = FIXTURES / "llama_w8a16_g32"
    config = load_hf_config(model_dir)
    assert isinstance(get_quant_config("compressed-tensors", config, model_dir), CompressedTensorsConfig)
    with pytest.raises(ValueError, match=r"'compressed-tensors' needs a checkpoint in that format .* has none"):
        get_quant_config("compressed-tensors", None, tmp_path)
    with pytest.raises(ValueError, match=r"already quantized \(quantization_config method 'compressed-tensors'\); "
                                         r"loading it as 'wint8' is not possible"):
        get_quant_config("wint8", config, model_dir)


def _qkv(quant):
    from ascend_llm.layers.linear import QKVParallelLinear
    return QKVParallelLinear(64, 16, 4, 2, prefix="model.layers.0.self_attn.qkv_proj", quant_config=quant)


def test_targets_and_ignore_per_fused_layer():
    packed = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}
    config = _config("llama_w4a16_g32")
    config["ignore"] = ["lm_head", "re:model\\.layers\\.0\\.self_attn\\.[qkv]_proj"]
    assert type(_qkv(CompressedTensorsConfig.from_config(config, packed)).quant_method).__name__ \
        == "UnquantizedLinearMethod"
    config["ignore"] = ["lm_head", "model.layers.0.self_attn.q_proj"]
    with pytest.raises(ValueError, match=r"qkv_proj: the fused shards have different compressed-tensors schemes"):
        _qkv(CompressedTensorsConfig.from_config(config, packed))
    # two groups: a named target wins over the "Linear" class target (mixed precision)
    mixed = _config("llama_w4a16_g32")
    mixed["config_groups"]["attn"] = dict(_config("llama_w8a8_int8_dynamic")["config_groups"]["group_0"],
                                          targets=["re:.*self_attn\\.[qkv]_proj$"])
    mixed["format"] = "mixed-precision"
    assert type(_qkv(CompressedTensorsConfig.from_config(mixed, packed)).quant_method).__name__ \
        == "CtW8A8DynamicMethod"
