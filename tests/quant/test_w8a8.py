"""msModelSlim W8A8 / W8A8_DYNAMIC / W8A16: format detection, exact kernels, loading, tiny model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from ascend_llm.engine.kv_cache import KVCacheSpec, allocate_kv_caches
from ascend_llm.layers.linear import (MergedColumnParallelLinear, QKVParallelLinear,
                                      ReplicatedLinear, RowParallelLinear)
from ascend_llm.loader import iter_safetensors_weights, load_hf_config
from ascend_llm.models.forward_batch import ForwardBatch
from ascend_llm.models.registry import get_model_class
from ascend_llm.models.weight_utils import process_weights_after_loading
from ascend_llm.ops import AttentionMetadata, build_op_set
from ascend_llm.quant.formats import detect_quant_format
from ascend_llm.quant.w8a8 import (AscendW8A8Config, W8A8DynamicLinearMethod, W8A8StaticLinearMethod,
                                   W8A16LinearMethod, decode_deq_scale, encode_deq_scale_int64)
from tests.quant.w8a8_writer import (activation_params, quantize_weight_asymmetric,
                                     quantize_weight_symmetric, write_w8a8_checkpoint)

TOKEN_COUNTS = (1, 7, 33)


# ----------------------------------------------------------------------------- format detection

def _write_json(path, obj) -> None:
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)


GOOD_DESCRIPTION = {"model_quant_type": "W8A8", "version": "1.0.0", "group_size": 0,
                    "model.layers.0.self_attn.q_proj.weight": "W8A8",
                    "model.layers.0.self_attn.q_proj.deq_scale": "W8A8",
                    "model.embed_tokens.weight": "FLOAT"}


@pytest.mark.parametrize("filename", ["quant_model_description.json", "quant_model_description_w8a8.json"])
def test_detect_description(tmp_path, filename):
    _write_json(tmp_path / filename, GOOD_DESCRIPTION)
    found = detect_quant_format(tmp_path)
    assert found["format"] == "ascend" and found["model_quant_type"] == "W8A8"
    assert found["path"].endswith(filename)
    assert found["description"]["model.embed_tokens.weight"] == "FLOAT"


def test_detect_float_and_config_json(tmp_path):
    _write_json(tmp_path / "config.json", {"architectures": ["LlamaForCausalLM"]})
    assert detect_quant_format(tmp_path) is None
    _write_json(tmp_path / "config.json", {"quantization_config": {"quant_method": "FP8"}})
    assert detect_quant_format(tmp_path)["format"] == "fp8"
    # a description wins over a leftover mindie-format quantization_config
    _write_json(tmp_path / "config.json", {"quantize": "w8a8", "quantization_config": {"w_bit": 8}})
    _write_json(tmp_path / "quant_model_description_w8a8.json", GOOD_DESCRIPTION)
    _write_json(tmp_path / "quant_model_description_w8a8_dynamic.json",
                {**GOOD_DESCRIPTION, "model_quant_type": "W8A8_DYNAMIC"})
    assert detect_quant_format(tmp_path)["model_quant_type"] == "W8A8"   # config "quantize" picks


@pytest.mark.parametrize("content, message", [
    ("{not json", "unreadable"),
    ([1, 2], "JSON object"),
    ({"version": "1.0.0", "x.weight": "W8A8"}, "model_quant_type"),
    ({"model_quant_type": "W3A5", "x.weight": "FLOAT"}, "unknown model_quant_type 'W3A5'"),
    ({"model_quant_type": "W8A8", "x.weight": "W9"}, "'x.weight' has unknown quant type"),
    ({"model_quant_type": "W8A8", "group_size": -1, "x.weight": "W8A8"}, "group_size"),
    ({"model_quant_type": "W8A8"}, "no tensors"),
])
def test_detect_malformed_description(tmp_path, content, message):
    _write_json(tmp_path / "quant_model_description.json", content)
    with pytest.raises(ValueError, match=message):
        detect_quant_format(tmp_path)


def test_detect_malformed_config_json(tmp_path):
    _write_json(tmp_path / "config.json", {"quantization_config": {"w_bit": 8}})
    with pytest.raises(ValueError, match="no 'quant_method'"):
        detect_quant_format(tmp_path)
    _write_json(tmp_path / "config.json", "{oops")
    with pytest.raises(ValueError, match="config.json"):
        detect_quant_format(tmp_path)


def test_config_rejects_mixed_fused_shards_and_unsupported_types():
    desc = {"model_quant_type": "W8A8", "a.q_proj.weight": "W8A8", "a.k_proj.weight": "W8A8",
            "a.v_proj.weight": "FLOAT", "b.o_proj.weight": "W4A8_DYNAMIC"}
    config = AscendW8A8Config(desc)
    with pytest.raises(ValueError, match="a.qkv_proj: fused shards have different quant types"):
        config.get_quant_method(None, "a.qkv_proj")
    with pytest.raises(ValueError, match="b.o_proj: quant type 'W4A8_DYNAMIC' is not supported"):
        config.get_quant_method(None, "b.o_proj")
    with pytest.raises(ValueError, match="c.down_proj"):
        config.get_quant_method(None, "c.down_proj")
    assert config.get_quant_method(None, "a.v_proj") is None   # FLOAT -> unquantized


def test_config_reports_checkpoint_and_norm_biases():
    desc = {"model_quant_type": "W8A8_DYNAMIC", "l.self_attn.q_proj.weight": "W8A8_DYNAMIC",
            "l.self_attn.k_proj.weight": "W8A8_DYNAMIC", "l.self_attn.v_proj.weight": "W8A8_DYNAMIC",
            "l.self_attn.q_proj.bias": "FLOAT", "l.mlp.down_proj.weight": "W8A8_DYNAMIC",
            "l.input_layernorm.weight": "FLOAT", "l.input_layernorm.bias": "FLOAT"}
    config = AscendW8A8Config(desc)
    assert config.get_quant_method(None, "l.self_attn.qkv_proj").checkpoint_bias
    assert not config.get_quant_method(None, "l.mlp.down_proj").checkpoint_bias
    assert config.norm_has_bias("l.input_layernorm") and not config.norm_has_bias("l.norm")
    assert config.any_norm_bias and not _config_for("W8A8").any_norm_bias


# ----------------------------------------------------------------------------- deq_scale encoding

def test_deq_scale_int64_round_trip():
    gen = torch.Generator().manual_seed(0)
    values = torch.cat([torch.rand(61, generator=gen) * 1e-3,
                        torch.tensor([1e-38, 1.0, 3.4e38, 1.17549435e-38, 7.0e-45])]).to(torch.float32)
    encoded = encode_deq_scale_int64(values)
    assert encoded.dtype == torch.int64
    # low 32 bits = IEEE float32 bits (msModelSlim: np.frombuffer(fp32.tobytes(), int32).astype(int64))
    expected = np.frombuffer(values.numpy().tobytes(), dtype=np.int32).astype(np.int64)
    assert np.array_equal(encoded.numpy(), expected)
    assert bool((encoded >> 32 == 0).all())            # positive scales: upper half is zero
    assert torch.equal(decode_deq_scale(encoded).view(torch.int32), values.view(torch.int32))
    negative = torch.tensor([-0.5, -2.0e-3], dtype=torch.float32)
    assert torch.equal(decode_deq_scale(encode_deq_scale_int64(negative)), negative)
    # an unsigned-widened encoding (upper bits zero even for negative) decodes the same
    assert torch.equal(decode_deq_scale(encode_deq_scale_int64(negative) & 0xFFFFFFFF), negative)
    assert torch.equal(decode_deq_scale(values), values)
    with pytest.raises(ValueError, match="deq_scale"):
        decode_deq_scale(torch.zeros(2, dtype=torch.int32))


# ----------------------------------------------------------------------------- per-method exactness

HIDDEN, HEAD_DIM, HEADS, KV_HEADS = 40, 8, 4, 2     # q 32 rows, k/v 16 rows each


def _random_static_shard(gen: torch.Generator, rows: int, k: int, scale_range: float,
                         deq_int64: bool = True) -> dict[str, torch.Tensor]:
    """Random checkpoint tensors of one W8A8 static Linear, in the msModelSlim dtypes."""
    weight = torch.randint(-128, 128, (rows, k), generator=gen, dtype=torch.int8)
    scale, offset = activation_params(-scale_range * 0.7, scale_range)
    deq = (torch.rand(rows, generator=gen) * 1e-3 + 1e-5).to(torch.float32)
    return {"weight": weight, "input_scale": scale, "input_offset": offset,
            "deq_scale": encode_deq_scale_int64(deq) if deq_int64 else deq,
            "quant_bias": torch.randint(-5000, 5000, (rows,), generator=gen, dtype=torch.int32)}


def _load(layer, shards: dict) -> None:
    """Feed each shard's checkpoint tensors through the parameters' weight loaders."""
    params = dict(layer.named_parameters())
    for shard_id, tensors in shards.items():
        for name, tensor in tensors.items():
            params[name].weight_loader(params[name], tensor, shard_id)
    layer.quant_method.process_weights_after_loading(layer)


def _numpy_static(x: torch.Tensor, t: dict[str, torch.Tensor], add_bias: bool = True) -> np.ndarray:
    """Independent numpy reference: float32 quantize, exact int64 matmul, float32 dequant."""
    x32 = x.numpy().astype(np.float32)
    scale = t["input_scale"].numpy().astype(np.float32)[0]
    offset = t["input_offset"].numpy().astype(np.float32)[0]
    q = np.clip(np.rint(x32 / scale + offset), -128, 127).astype(np.int64)       # [T, k]
    acc = q @ t["weight"].numpy().astype(np.int64).T                               # [T, n] exact
    if add_bias:
        acc = acc + t["quant_bias"].numpy().astype(np.int64)
    deq = t["deq_scale"]
    deq = np.frombuffer(deq.numpy().astype(np.int32).tobytes(), np.float32) if deq.dtype == torch.int64 \
        else deq.numpy().astype(np.float32)
    return acc.astype(np.float32) * deq


def _static_layer(kind: str, config: AscendW8A8Config, params_dtype=torch.float32, **kw):
    if kind == "qkv":
        return QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, KV_HEADS, False, params_dtype, config,
                                 "m.qkv_proj", **kw)
    if kind == "gate_up":
        return MergedColumnParallelLinear(HIDDEN, [24, 24], False, params_dtype, config,
                                          "m.gate_up_proj", **kw)
    if kind == "row":
        return RowParallelLinear(HIDDEN, 24, False, params_dtype, config, "m.o_proj", **kw)
    return ReplicatedLinear(HIDDEN, 24, False, params_dtype, config, "m.o_proj")


def _config_for(quant_type: str) -> AscendW8A8Config:
    names = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "o_proj")
    return AscendW8A8Config({"model_quant_type": quant_type,
                             **{f"m.{n}.weight": quant_type for n in names}})


SHARDS = {"qkv": {"q": 32, "k": 16, "v": 16}, "gate_up": {0: 24, 1: 24},
          "row": {None: 24}, "replicated": {None: 24}}


@pytest.mark.parametrize("kind", ["qkv", "gate_up", "row", "replicated"])
@pytest.mark.parametrize("equal_scales", [True, False])
def test_w8a8_static_apply_is_exact(kind, equal_scales):
    gen = torch.Generator().manual_seed(1)
    layer = _static_layer(kind, _config_for("W8A8"))
    assert isinstance(layer.quant_method, W8A8StaticLinearMethod)
    shards = {sid: _random_static_shard(gen, rows, HIDDEN, 3.0 if equal_scales else 1.0 + i)
              for i, (sid, rows) in enumerate(SHARDS[kind].items())}
    _load(layer, shards)
    assert len(layer.w8a8_groups) == (1 if equal_scales else len(shards))
    for tokens in TOKEN_COUNTS:
        x = torch.randn(tokens, HIDDEN, generator=gen) * 2
        got = layer(x)                                                               # [T, n]
        want = np.concatenate([_numpy_static(x, t) for t in shards.values()], axis=1)
        assert got.shape == (tokens, sum(SHARDS[kind].values())) and got.dtype == torch.float32
        assert np.array_equal(got.numpy(), want)                                     # bit-exact


def test_w8a8_static_ignores_float_bias_and_row_rank_skips_quant_bias():
    gen = torch.Generator().manual_seed(2)
    config = _config_for("W8A8")
    t = _random_static_shard(gen, 24, HIDDEN // 2, 2.0)
    rank1 = RowParallelLinear(HIDDEN, 24, False, torch.float32, config, "m.o_proj", tp_rank=1, tp_size=2)
    full_weight = torch.cat([torch.zeros_like(t["weight"]), t["weight"]], dim=1)   # rank 1 takes cols k/2:
    _load(rank1, {None: {**t, "weight": full_weight}})
    x = torch.randn(7, HIDDEN // 2, generator=gen)
    assert np.array_equal(rank1(x).numpy(), _numpy_static(x, t, add_bias=False))
    qkv_bias = QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, KV_HEADS, True, torch.float32, config, "m.qkv_proj")
    shards = {sid: _random_static_shard(gen, rows, HIDDEN, 2.0) for sid, rows in SHARDS["qkv"].items()}
    _load(qkv_bias, {sid: {**t, "bias": torch.full((t["weight"].shape[0],), 9.0)}
                     for sid, t in shards.items()})
    x = torch.randn(7, HIDDEN, generator=gen)
    want = np.concatenate([_numpy_static(x, t) for t in shards.values()], axis=1)
    assert np.array_equal(qkv_bias(x).numpy(), want)     # bias is folded into quant_bias already


@pytest.mark.parametrize("kind", ["qkv", "gate_up"])
def test_w8a8_static_column_parallel_rank_is_a_slice_of_the_full_layer(kind):
    gen = torch.Generator().manual_seed(8)
    config = _config_for("W8A8")
    shards = {sid: _random_static_shard(gen, rows, HIDDEN, 1.0 + i)
              for i, (sid, rows) in enumerate(SHARDS[kind].items())}
    full = _static_layer(kind, config)
    _load(full, shards)
    x = torch.randn(7, HIDDEN, generator=gen)
    want = full(x)                                                                   # [T, n]
    for rank in range(2):
        part = _static_layer(kind, config, tp_rank=rank, tp_size=2)
        _load(part, shards)
        rows = [(off + rank * size // 2, size // 2) for off, size in
                zip(np.cumsum([0, *SHARDS[kind].values()])[:-1], SHARDS[kind].values())]
        expected = torch.cat([want[:, int(a):int(a) + int(n)] for a, n in rows], dim=1)
        assert torch.equal(part(x), expected)


@pytest.mark.parametrize("ckpt_int64, params_dtype", [(True, torch.bfloat16), (False, torch.float16),
                                                      (False, torch.float32)])
def test_deq_scale_loads_by_value_across_dtypes(ckpt_int64, params_dtype):
    """A bf16-calibrated (fp32 deq) checkpoint served as fp16 (int64 param) and the reverse."""
    gen = torch.Generator().manual_seed(3)
    layer = _static_layer("replicated", _config_for("W8A8"), params_dtype)
    assert layer.deq_scale.dtype == (torch.float32 if params_dtype == torch.bfloat16 else torch.int64)
    t = _random_static_shard(gen, 24, HIDDEN, 2.0, deq_int64=ckpt_int64)
    _load(layer, {None: t})
    assert torch.equal(layer.deq_scale_fp32, decode_deq_scale(t["deq_scale"]))
    x = torch.randn(7, HIDDEN, generator=gen).to(params_dtype)
    want = torch.from_numpy(_numpy_static(x.float(), t)).to(params_dtype)
    assert torch.equal(layer(x), want)


def test_static_rejects_bad_per_tensor_values():
    gen = torch.Generator().manual_seed(4)
    layer = _static_layer("replicated", _config_for("W8A8"))
    t = _random_static_shard(gen, 24, HIDDEN, 2.0)
    with pytest.raises(ValueError, match=r"m.o_proj.input_offset: must be integers"):
        _load(layer, {None: {**t, "input_offset": torch.tensor([0.5])}})
    with pytest.raises(ValueError, match=r"m.o_proj.input_scale: expected a per-tensor value of shape \[1\]"):
        _load(layer, {None: {**t, "input_scale": torch.ones(2)}})


def _numpy_dynamic(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                   bias: torch.Tensor | None) -> np.ndarray:
    x32 = x.numpy().astype(np.float32)
    token_scale = np.abs(x32).max(axis=1) / np.float32(127)                         # [T]
    divisor = np.where(token_scale > 0, token_scale, np.float32(1))                  # all-zero token -> q 0
    q = np.clip(np.rint(x32 / divisor[:, None]), -128, 127).astype(np.int64)
    acc = (q @ weight.numpy().astype(np.int64).T).astype(np.float32)                # [T, n]
    out = acc * scale.numpy().reshape(1, -1).astype(np.float32) * token_scale[:, None]
    return out if bias is None else out + bias.numpy().astype(np.float32)


@pytest.mark.parametrize("kind", ["qkv", "gate_up", "row"])
def test_w8a8_dynamic_apply_is_exact(kind):
    gen = torch.Generator().manual_seed(5)
    layer = _static_layer(kind, _config_for("W8A8_DYNAMIC"))
    assert isinstance(layer.quant_method, W8A8DynamicLinearMethod)
    shards = {}
    for sid, rows in SHARDS[kind].items():
        q_w, scale = quantize_weight_symmetric(torch.randn(rows, HIDDEN, generator=gen))
        shards[sid] = {"weight": q_w, "weight_scale": scale[:, None],
                       "weight_offset": torch.zeros(rows, 1)}
    _load(layer, shards)
    weight = torch.cat([t["weight"] for t in shards.values()])
    scale = torch.cat([t["weight_scale"] for t in shards.values()])
    for tokens in TOKEN_COUNTS:
        x = torch.randn(tokens, HIDDEN, generator=gen) * 3
        x[0, :] = 0 if tokens > 1 else x[0, :]       # an all-zero token must not divide by zero
        got = layer(x)
        want = _numpy_dynamic(x, weight, scale, None)
        assert np.array_equal(got.numpy(), want)


def test_w8a16_apply_matches_float64():
    gen = torch.Generator().manual_seed(6)
    layer = _static_layer("gate_up", _config_for("W8A16"))
    assert isinstance(layer.quant_method, W8A16LinearMethod)
    floats, shards = [], {}
    for sid, rows in SHARDS["gate_up"].items():
        q_w, scale, offset = quantize_weight_asymmetric(torch.randn(rows, HIDDEN, generator=gen))
        shards[sid] = {"weight": q_w, "weight_scale": scale[:, None], "weight_offset": offset[:, None]}
        floats.append((q_w.double() - offset.double()[:, None]) * scale.double()[:, None])
    _load(layer, shards)
    w64 = torch.cat(floats)                                                          # [n, k]
    for tokens in TOKEN_COUNTS:
        x = torch.randn(tokens, HIDDEN, generator=gen)
        # float32 antiquant + matmul vs float64: only rounding of ~40-term sums differs
        assert torch.allclose(layer(x).double(), x.double() @ w64.T, atol=1e-5, rtol=1e-5)


def test_dynamic_rejects_asymmetric_weights_and_groups():
    layer = _static_layer("replicated", _config_for("W8A8_DYNAMIC"))
    with pytest.raises(ValueError, match="m.o_proj.weight_offset"):
        _load(layer, {None: {"weight": torch.zeros(24, HIDDEN, dtype=torch.int8),
                             "weight_scale": torch.ones(24, 1), "weight_offset": torch.ones(24, 1)}})
    with pytest.raises(ValueError, match="per-group"):
        AscendW8A8Config({"model_quant_type": "W8A8_DYNAMIC", "group_size": 64,
                          "m.o_proj.weight": "W8A8_DYNAMIC"}).get_quant_method(None, "m.o_proj")


# ----------------------------------------------------------------------------- tiny model end to end

MIXED_TYPES = {"layers.0.mlp.down_proj": "W8A8_DYNAMIC", "layers.1.self_attn.o_proj": "W8A16",
               "layers.1.mlp.down_proj": "FLOAT"}


@pytest.fixture(scope="module")
def w8a8_dirs(tiny_llama_dir, tiny_qwen2_dir, tmp_path_factory):
    """(float dir, quantized dir) per case; Qwen2 has q/k/v biases (folded into quant_bias)."""
    return {
        "static": (tiny_llama_dir, write_w8a8_checkpoint(tiny_llama_dir, tmp_path_factory.mktemp("w8a8"))),
        "mixed": (tiny_llama_dir, write_w8a8_checkpoint(tiny_llama_dir, tmp_path_factory.mktemp("mixed"),
                                                        layer_types=MIXED_TYPES)),
        "qwen2_static": (tiny_qwen2_dir, write_w8a8_checkpoint(tiny_qwen2_dir,
                                                               tmp_path_factory.mktemp("qwen2_w8a8"))),
    }


def test_writer_layout(w8a8_dirs):
    static, mixed = w8a8_dirs["static"][1], w8a8_dirs["mixed"][1]
    description = json.loads((static / "quant_model_description.json").read_text())
    assert description["model_quant_type"] == "W8A8" and description["version"] == "1.0.0"
    prefix = "model.layers.0.self_attn.q_proj"
    with safe_open(str(static / "quant_model_weights.safetensors"), "pt") as f:
        assert f.get_tensor(f"{prefix}.weight").dtype == torch.int8
        assert f.get_tensor(f"{prefix}.weight").shape == (64, 64)
        for name, dtype, shape in [("input_scale", torch.float32, (1,)), ("input_offset", torch.float32, (1,)),
                                   ("deq_scale", torch.int64, (64,)), ("quant_bias", torch.int32, (64,))]:
            tensor = f.get_tensor(f"{prefix}.{name}")
            assert (tensor.dtype, tuple(tensor.shape)) == (dtype, shape), name
            assert description[f"{prefix}.{name}"] == "W8A8"
    assert description["model.norm.weight"] == "FLOAT"
    assert (static / "config.json").is_file() and (static / "tokenizer.json").is_file()
    mixed_desc = json.loads((mixed / "quant_model_description.json").read_text())
    assert mixed_desc["model.layers.1.mlp.down_proj.weight"] == "FLOAT"
    assert mixed_desc["model.layers.0.mlp.down_proj.weight_scale"] == "W8A8_DYNAMIC"
    assert mixed_desc["model.layers.1.self_attn.o_proj.weight_offset"] == "W8A16"


def _build(model_dir, quantized: bool):
    config = load_hf_config(model_dir)
    quant_config = AscendW8A8Config.from_model_dir(model_dir) if quantized else None
    model = get_model_class(config)(config, build_op_set("cpu"), quant_config, torch.float32)
    model.load_weights(iter_safetensors_weights(model_dir))
    process_weights_after_loading(model)
    return config, model.eval()


@torch.inference_mode()
def _prefill_logits(model, config, token_ids: list[int], block_size: int = 4) -> torch.Tensor:
    """Logits of every position of one prefill [T, vocab]."""
    num_blocks = -(-len(token_ids) // block_size) + 1
    kv = allocate_kv_caches(KVCacheSpec.from_hf_config(config, block_size, torch.float32), num_blocks,
                            torch.device("cpu"))
    table = list(range(num_blocks))
    n = len(token_ids)
    meta = AttentionMetadata.build([n], [n], [table], list(range(n)), block_size, num_blocks,
                                   torch.device("cpu"))
    batch = ForwardBatch(torch.tensor(token_ids), torch.arange(n), meta, kv, torch.arange(n))
    return model.compute_logits(model(batch))


def _linear_io(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Register hooks recording every Linear's (input, output); returns the (filled later) dict."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, module in model.named_modules():
        if hasattr(module, "quant_method"):
            module.register_forward_hook(
                lambda _m, args, out, name=name: seen.__setitem__(name, (args[0].clone(), out.clone())))
    return seen


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("which", ["static", "mixed", "qwen2_static"])
def test_tiny_llama_w8a8_close_to_float(w8a8_dirs, which):
    """Tolerances: 8-bit quantization gives ~0.5-2 % relative L2 error per Linear (weights
    per-channel: step/sqrt(12) of max|W|/127; per-tensor activations: (max-min)/255 over the whole
    tensor, larger with heavy-tailed inputs: down_proj sees silu(gate) * up, which is why msModelSlim
    falls it back to float by default). Measured here: <= 2.8 % per Linear for Llama, 4.3 % for
    Qwen2's down_proj, ~4 % on the logits after 2 layers; the bounds leave ~1.4-2x margin, while a
    wrong formula (a missing zero-point term, a mis-decoded deq_scale) gives errors of order 100 %."""
    float_dir, quant_dir = w8a8_dirs[which]
    token_ids = torch.randint(3, 300, (33,), generator=torch.Generator().manual_seed(7)).tolist()
    config, float_model = _build(float_dir, quantized=False)
    _, quant_model = _build(quant_dir, quantized=True)
    qkv = quant_model.model.layers[0].self_attn.qkv_proj
    assert qkv.weight.dtype == torch.int8 and len(qkv.w8a8_groups) == 1   # q/k/v share calibration
    float_io = _linear_io(float_model)
    want = _prefill_logits(float_model, config, token_ids)
    got = _prefill_logits(quant_model, config, token_ids)
    quant_layers = dict(quant_model.named_modules())
    for name, (x, y) in float_io.items():      # each Linear on the float model's own activations
        with torch.inference_mode():
            assert _relative_error(quant_layers[name](x), y) < 0.06, name
    assert 0 < _relative_error(got, want) < 0.08, _relative_error(got, want)
