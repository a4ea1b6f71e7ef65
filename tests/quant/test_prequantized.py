"""Pre-quantized checkpoints written from a tiny float Llama by tests/quant/prequant_writers.py,
loaded by `LLM` from config.json's `quantization_config` alone.

Tolerances (mean / max |d logprob| over the prompt tokens, vs the named reference):
- FastDeploy wint8 / wint4 hold exactly the codes online wint8 / wint4 computes: logprobs equal
  the online method's to 1e-4.
- AutoFP8 dynamic vs online fp8: unfused layers hold bit-identical e4m3 weights and scales
  (asserted), but fused shards below the max scale are re-quantized once more, one extra e4m3
  rounding of those rows, as large as the first: measured mean 0.047 (each is ~0.04 from
  float), bound 0.15. Every fp8 variant vs float: the fp8 bounds of test_quantized_models.py
  (0.12 / 0.6).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ascend_llm import LLM, SamplingParams
from ascend_llm.numerics import primitives as P
from ascend_llm.quant.registry import get_quant_config
from tests.quant.prequant_writers import write_autofp8, write_deepseek_fp8, write_fastdeploy_weight_only

PARAMS = SamplingParams(max_tokens=4, prompt_logprobs=0, temperature=0.0, ignore_eos=True)
FP8_BOUNDS = (0.12, 0.6)


def _prompts() -> list[list[int]]:
    return [[(7 * i + 13 * j) % 381 + 3 for j in range(5 + 9 * i)] for i in range(4)]


def _run(model_dir: Path, quantization: str | None = None) -> tuple[LLM, torch.Tensor]:
    llm = LLM(str(model_dir), quantization=quantization, max_model_len=96)
    prompts = _prompts()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=PARAMS, use_tqdm=False)
    lps = [e[t].logprob for p, o in zip(prompts, outs) for t, e in zip(p[1:], o.prompt_logprobs[1:])]
    assert all(len(o.outputs[0].token_ids) == PARAMS.max_tokens for o in outs)
    return llm, torch.tensor(lps)


def _layer(llm: LLM, index: int = 0):
    return llm.llm_engine.model_runner.model.model.layers[index]


def _within(err: torch.Tensor, bounds: tuple[float, float]) -> bool:
    return float(err.mean()) < bounds[0] and float(err.max()) < bounds[1]


@pytest.fixture(scope="module")
def float_lps(tiny_llama_dir) -> torch.Tensor:
    return _run(tiny_llama_dir)[1]


@pytest.mark.parametrize("bits, int4_as_int8", [(8, False), (4, False), (4, True)])
def test_fastdeploy_weight_only_equals_online(tiny_llama_dir, tmp_path, bits, int4_as_int8):
    out = write_fastdeploy_weight_only(tiny_llama_dir, tmp_path / f"wint{bits}", bits, int4_as_int8)
    llm, lps = _run(out)
    _, online = _run(tiny_llama_dir, f"wint{bits}")
    torch.testing.assert_close(lps, online, rtol=0, atol=1e-4)
    qkv = _layer(llm).self_attn.qkv_proj
    assert qkv.weight.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert qkv.weight_only_kernel is not None and qkv.weight_scale.shape == (128,)


def test_fastdeploy_wint8_rejects_biased_uint8(tiny_llama_dir, tmp_path):
    out = write_fastdeploy_weight_only(tiny_llama_dir, tmp_path / "biased", 8)
    tensors = _checkpoint(out)
    name = "model.layers.0.mlp.down_proj.quant_weight"
    tensors[name] = (tensors[name].to(torch.int16) + 128).to(torch.uint8)    # CUTLASS's +128 bias
    from safetensors.torch import save_file
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match="down_proj.quant_weight: checkpoint tensor has dtype torch.uint8, "
                                         "expected torch.int8"):
        LLM(str(out), max_model_len=64)


def test_fastdeploy_flags(tiny_llama_dir, tmp_path):
    # is_permuted true on row-major bytes: refused by name (tests/quant/test_peer_fastdeploy.py reads
    # the real CUTLASS layout)
    permuted = write_fastdeploy_weight_only(tiny_llama_dir, tmp_path / "perm", 8, is_permuted=True)
    with pytest.raises(ValueError, match=r"quant_weight(\[\w+\])?: .*is_permuted: true"):
        LLM(str(permuted), max_model_len=64)
    config = get_quant_config(None, _Config({"quantization": "wint4", "is_quantized": False}))
    assert config.get_name() == "wint4"                      # a float checkpoint quantized online


def test_autofp8_dynamic_requantizes_fused_shards_to_max_scale(tiny_llama_dir, tmp_path, float_lps):
    out = write_autofp8(tiny_llama_dir, tmp_path / "fp8dyn")
    llm, lps = _run(out)
    online_llm, online = _run(tiny_llama_dir, "fp8")
    assert float((lps - online).abs().mean()) < 0.15
    assert _within((lps - float_lps).abs(), FP8_BOUNDS)
    for index in (0, 1):                                       # unfused layers: bit-identical
        got, ref = _layer(llm, index).self_attn.o_proj, _layer(online_llm, index).self_attn.o_proj
        assert torch.equal(got.weight.data.view(torch.uint8), ref.weight.data.view(torch.uint8))
        assert float(got.weight_scale) == float(ref.weight_scale)
    qkv = _layer(llm).self_attn.qkv_proj
    assert qkv.weight.dtype == torch.float8_e4m3fn and qkv.weight_scale.dim() == 0
    assert qkv.fp8_kernel.name.startswith("cpu.fp8_matmul_per_tensor")
    shards = {n: t for n, t in _checkpoint(out).items() if n.startswith("model.layers.0.self_attn.")}
    scales = [shards[f"model.layers.0.self_attn.{s}_proj.weight_scale"] for s in "qkv"]
    assert len({float(s) for s in scales}) == 3                # different per-shard scales
    top = max(range(3), key=lambda i: float(scales[i]))
    assert float(qkv.weight_scale) == float(scales[top])
    rows = [(0, 64), (64, 96), (96, 128)][top]                 # the max-scale shard is kept bit for bit
    kept = shards[f"model.layers.0.self_attn.{'qkv'[top]}_proj.weight"]
    assert torch.equal(qkv.weight.data[rows[0]:rows[1]].view(torch.uint8), kept.view(torch.uint8))


def test_autofp8_static_uses_max_input_scale(tiny_llama_dir, tmp_path, float_lps):
    out = write_autofp8(tiny_llama_dir, tmp_path / "fp8static", static=True,
                        input_scale_factors={"k_proj": 1.5})
    llm, lps = _run(out)
    assert _within((lps - float_lps).abs(), FP8_BOUNDS)
    qkv = _layer(llm).self_attn.qkv_proj
    assert qkv.fp8_kernel.name == "cpu.fp8_matmul_per_tensor_static"
    k_scale = _checkpoint(out)["model.layers.0.self_attn.k_proj.input_scale"]
    q_scale = _checkpoint(out)["model.layers.0.self_attn.q_proj.input_scale"]
    assert float(k_scale) == pytest.approx(1.5 * float(q_scale))
    assert float(qkv.input_scale) == float(k_scale)            # max over the shards


def test_autofp8_ignored_layers(tiny_llama_dir, tmp_path):
    ignored = ["model.layers.0.mlp.down_proj", r"re:model\.layers\.1\.self_attn\.[qkv]_proj"]
    llm, _ = _run(write_autofp8(tiny_llama_dir, tmp_path / "ign", ignored_layers=ignored))
    assert _layer(llm, 0).mlp.down_proj.weight.dtype == torch.float32
    assert _layer(llm, 1).self_attn.qkv_proj.weight.dtype == torch.float32
    assert _layer(llm, 0).self_attn.qkv_proj.weight.dtype == torch.float8_e4m3fn
    assert _layer(llm, 1).mlp.down_proj.weight.dtype == torch.float8_e4m3fn
    partial = write_autofp8(tiny_llama_dir, tmp_path / "partial",
                            ignored_layers=["model.layers.0.self_attn.q_proj"])
    with pytest.raises(ValueError, match="qkv_proj: ignored_layers covers only some fused shards"):
        LLM(str(partial), max_model_len=64)


def test_deepseek_block_fp8(tiny_llama_dir, tmp_path, float_lps):
    out = write_deepseek_fp8(tiny_llama_dir, tmp_path / "ds", block=(32, 32))
    llm, lps = _run(out)
    assert _within((lps - float_lps).abs(), FP8_BOUNDS)
    qkv = _layer(llm).self_attn.qkv_proj
    assert qkv.fp8_kernel.name.startswith("cpu.fp8_matmul_block") and qkv.weight_block_size == (32, 32)
    ckpt = _checkpoint(out)
    fused = torch.cat([ckpt[f"model.layers.0.self_attn.{s}_proj.weight"].float() for s in "qkv"])
    fused_scale = torch.cat([ckpt[f"model.layers.0.self_attn.{s}_proj.weight_scale_inv"] for s in "qkv"])
    assert qkv.weight_scale_inv.shape == (4, 2)                 # (64 + 32 + 32) / 32, 64 / 32
    torch.testing.assert_close(qkv.weight_scale_inv.data, fused_scale, rtol=0, atol=0)
    torch.testing.assert_close(qkv.weight.data.float(), fused, rtol=0, atol=0)
    assert get_quant_config("block_wise_fp8", None, out).weight_block_size == (32, 32)


def test_deepseek_block_partial_fused_shards_keep_their_own_grids(tiny_llama_dir, tmp_path, float_lps):
    """q/k/v with n = 64/32/32 and 128-row blocks: each shard has its own (partial) block grid,
    so the layer expands them to one scale row per output row (block size (1, 128))."""
    out = write_deepseek_fp8(tiny_llama_dir, tmp_path / "ds128", block=(128, 128))
    llm, lps = _run(out)
    assert _within((lps - float_lps).abs(), FP8_BOUNDS)
    qkv = _layer(llm).self_attn.qkv_proj
    assert qkv.weight_block_size == (1, 128) and qkv.weight_scale_inv.shape == (128, 1)
    ckpt = _checkpoint(out)
    want = torch.cat([ckpt[f"model.layers.0.self_attn.{s}_proj.weight_scale_inv"].expand(n, 1)
                      for s, n in zip("qkv", (64, 32, 32))])
    torch.testing.assert_close(qkv.weight_scale_inv.data, want, rtol=0, atol=0)
    x = torch.randn(5, 64)
    deq = torch.cat([P.dequantize_fp8_block(ckpt[f"model.layers.0.self_attn.{s}_proj.weight"],
                                            ckpt[f"model.layers.0.self_attn.{s}_proj.weight_scale_inv"],
                                            (128, 128)) for s in "qkv"])
    ref = P.dequantize_fp8_per_token_group(*P.quantize_fp8_per_token_group(x, 128), group_size=128) @ deq.T
    torch.testing.assert_close(qkv(x), ref, rtol=1e-5, atol=1e-5)


def test_missing_scale_tensors_are_named(tiny_llama_dir, tmp_path):
    shard = write_autofp8(tiny_llama_dir, tmp_path / "noscale", static=True)
    _drop(shard, "model.layers.1.self_attn.k_proj.input_scale")
    with pytest.raises(ValueError, match="missing tensor 'model.layers.1.self_attn.k_proj.input_scale'"):
        LLM(str(shard), max_model_len=64)
    _drop(shard, "model.layers.0.self_attn.o_proj.weight_scale")
    with pytest.raises(ValueError, match="missing 1 tensors: model.layers.0.self_attn.o_proj.weight_scale"):
        LLM(str(shard), max_model_len=64)


class _Config:
    def __init__(self, quantization_config: dict) -> None:
        self.quantization_config = quantization_config


@pytest.mark.parametrize("qc, message", [
    ({"quant_method": "awq", "bits": 4},
     "method 'awq' is not supported; supported quant_method values: fp8, wint2, wint8, wint4"),
    ({"quant_method": "fp8"}, "activation_scheme must be one of"),
    ({"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128]},
     "weight_block_size must be two positive integers"),
    ({"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]},
     "needs activation_scheme 'dynamic'"),
    ({"quant_method": "fp8", "activation_scheme": "dynamic", "ignored_layers": "lm_head"},
     "ignored_layers must be a list of strings"),
    ({"quant_method": "fp8", "activation_scheme": "dynamic", "ignored_layers": ["re:(["]},
     "not a valid regex"),
    ({"bits": 4}, "has no 'quant_method'"),
    ({"quantization": "wint8", "is_quantized": "yes"}, "is_quantized must be true or false"),
])
def test_malformed_quantization_config(qc, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        get_quant_config(None, _Config(qc))


def test_online_names_on_quantized_checkpoints():
    autofp8 = _Config({"quant_method": "fp8", "activation_scheme": "dynamic"})
    assert get_quant_config("fp8", autofp8).get_name() == "fp8"            # the checkpoint's own name
    with pytest.raises(ValueError, match="already quantized.*'fp8'.*loading it as 'wint8'"):
        get_quant_config("wint8", autofp8)
    with pytest.raises(ValueError, match="loading it as 'block_wise_fp8'"):
        get_quant_config("block_wise_fp8", autofp8)                         # no weight_block_size


def _checkpoint(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(model_dir / "model.safetensors"))


def _drop(model_dir: Path, name: str) -> None:
    from safetensors.torch import save_file
    tensors = _checkpoint(model_dir)
    del tensors[name]
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
