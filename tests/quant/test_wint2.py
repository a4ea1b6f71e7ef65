"""WINT2 checkpoints: `quantization_config` parsing, the writer's tensors, loading through `LLM`.

Tolerances. Tiny Llama (hidden 64, intermediate 96), MLP in WINT2 (weight relative error 0.34)
and attention in wint8: measured mean |d logprob| vs float 0.20, max 0.61 (online wint4 of the
whole model on the same prompts: 0.12 / 0.51) -> bounds 0.5 / 1.5. With no WINT2 modules the
checkpoint holds exactly online wint8's codes: logprobs equal to 1e-4.

Slow: SmolLM2-135M perplexity on the first 1024 tokens of eval_tempest.txt, MLP WINT2 + attention
wint8, plain encoding (see test_smollm2_wint2_perplexity for the measured number).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ascend_llm import LLM, SamplingParams
from ascend_llm.layers.linear import MergedColumnParallelLinear
from ascend_llm.numerics import wint2 as L
from ascend_llm.quant.wint2 import WInt2Config
from calib.wint2 import encode as E
from calib.wint2.writer import main as writer_main
from calib.wint2.writer import write_wint2_checkpoint
from tests.quant.linear_fixtures import OPS, gen

PARAMS = SamplingParams(max_tokens=6, prompt_logprobs=0, temperature=0.0, ignore_eos=True)
DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "eval_tempest.txt"


def _run(model_dir: Path, quantization: str | None = None) -> tuple[LLM, torch.Tensor, list[list[int]]]:
    llm = LLM(str(model_dir), quantization=quantization, max_model_len=96)
    prompts = [[(7 * i + 13 * j) % 381 + 3 for j in range(5 + 9 * i)] for i in range(4)]
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=PARAMS, use_tqdm=False)
    lps = [e[t].logprob for p, o in zip(prompts, outs) for t, e in zip(p[1:], o.prompt_logprobs[1:])]
    return llm, torch.tensor(lps), [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def wint2_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wint2")
    write_wint2_checkpoint(tiny_llama_dir, out)
    return out


@pytest.fixture(scope="module")
def float_run(tiny_llama_dir):
    return _run(tiny_llama_dir)


def test_writer_tensors_have_fastdeploy_names_dtypes_shapes(wint2_dir):
    tensors = load_file(str(wint2_dir / "model.safetensors"))
    mlp = "model.layers.1.mlp"
    expected = {  # FastDeploy orientation [k, n]: gate/up k=64 n=96, down k=96 n=64
        f"{mlp}.gate_proj": (64, 96), f"{mlp}.up_proj": (64, 96), f"{mlp}.down_proj": (96, 64)}
    for module, (k, n) in expected.items():
        got = {name: (tensors[f"{module}.{name}"].dtype, tuple(tensors[f"{module}.{name}"].shape))
               for name in L.TENSOR_NAMES}
        assert got == {"quant_weight": (torch.uint8, (k // 4, n)), "weight_scale": (torch.uint8, (1, n)),
                       "super_scales": (torch.float32, (n,)), "code_scale": (torch.float32, (n,)),
                       "code_zp": (torch.float32, (n,))}
        assert f"{module}.weight" not in tensors
    attn = "model.layers.1.self_attn.q_proj"
    assert tensors[f"{attn}.weight"].dtype == torch.int8 and tensors[f"{attn}.weight"].shape == (64, 64)
    assert tensors[f"{attn}.weight_scale"].shape == (64,)
    qc = json.loads((wint2_dir / "config.json").read_text())["quantization_config"]
    assert qc["quantization"] == "wint2" and qc["dense_quant_type"] == "wint8"
    assert qc["dense_wint2_modules"] == ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def test_llm_loads_wint2_and_stays_close(wint2_dir, float_run):
    llm, lps, greedy = _run(wint2_dir)
    err = (lps - float_run[1]).abs()
    assert 0 < float(err.mean()) < 0.5 and float(err.max()) < 1.5
    assert all(len(g) == PARAMS.max_tokens for g in greedy)
    layer = llm.llm_engine.model_runner.model.model.layers[1]
    gate_up = layer.mlp.gate_up_proj
    assert gate_up.weight_only_kernel.name == "cpu.weight_only_matmul_wint2"
    assert layer.self_attn.qkv_proj.weight.dtype == torch.int8
    # the fused layer decodes to exactly the two checkpoint shards, stacked
    tensors = load_file(str(wint2_dir / "model.safetensors"))
    shards = [L.dequantize_wint2(*(tensors[f"model.layers.1.mlp.{s}.{t}"] for t in L.TENSOR_NAMES))
              for s in ("gate_proj", "up_proj")]
    fused = L.dequantize_wint2(*(getattr(gate_up, t) for t in L.TENSOR_NAMES))
    assert torch.equal(fused, torch.cat(shards))


def test_bfloat16_model_keeps_code_scales_exact(wint2_dir):
    # code_scale / code_zp need every fp32 bit (b * code_scale + code_zp must stay exact): the
    # loader must not round them to the model dtype; super_scales do live in the model dtype
    llm = LLM(str(wint2_dir), dtype="bfloat16", max_model_len=64)
    out = llm.generate(prompt_token_ids=[[5, 6, 7, 8]], sampling_params=SamplingParams(
        max_tokens=3, temperature=0.0, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 3
    gate_up = llm.llm_engine.model_runner.model.model.layers[0].mlp.gate_up_proj
    tensors = load_file(str(wint2_dir / "model.safetensors"))
    expected = torch.cat([tensors[f"model.layers.0.mlp.{s}.code_scale"] for s in ("gate_proj", "up_proj")])
    assert gate_up.code_scale.dtype == torch.float32 and torch.equal(gate_up.code_scale.data, expected)
    assert gate_up.super_scales.dtype == torch.bfloat16


def test_dense_wint8_only_equals_online_wint8(tiny_llama_dir, tmp_path, float_run):
    out = tmp_path / "w8only"
    write_wint2_checkpoint(tiny_llama_dir, out, dense_wint2_modules=())
    _, lps, greedy = _run(out)
    _, online, _ = _run(tiny_llama_dir, "wint8")
    torch.testing.assert_close(lps, online, rtol=0, atol=1e-4)
    assert greedy == float_run[2]


@pytest.mark.parametrize("num_tokens", [1, 7])
def test_wint2_layer_apply_matches_decoded_reference(num_tokens):
    config = WInt2Config(dense_wint2_modules=("mlp.gate_proj", "mlp.up_proj"),
                         packed_modules={"gate_up_proj": ("gate_proj", "up_proj")})
    encoded = [E.encode_wint2(torch.randn(n, 192, generator=gen(n)), refine_steps=0) for n in (40, 24)]
    deq = torch.cat([L.dequantize_wint2(*e.as_dict().values()) for e in encoded])       # [64, 192]
    for ops in (OPS, None):                              # bound kernel, then a bare layer
        layer = MergedColumnParallelLinear(192, [40, 24], bias=True, quant_config=config,
                                           prefix="model.layers.0.mlp.gate_up_proj", ops=ops)
        for index, e in enumerate(encoded):
            for name, tensor in e.as_dict().items():
                getattr(layer, name).weight_loader(getattr(layer, name), tensor, index)
        bias = torch.randn(64, generator=gen(5))
        for index, part in enumerate(bias.split([40, 24])):
            layer.bias.weight_loader(layer.bias, part, index)
        layer.quant_method.process_weights_after_loading(layer)
        x = torch.randn(num_tokens, 192, generator=gen(num_tokens))
        torch.testing.assert_close(layer(x), F.linear(x, deq, bias), rtol=1e-5, atol=1e-5)
        assert (layer.weight_only_kernel is None) == (ops is None)


def test_config_parsing():
    qc = {"quantization": "wint2", "dense_quant_type": "wint4", "dense_quant_config": "wint8",
          "moe_quant_type": "w4w2",
          "moe_quant_config": {"moe_w4_quant_config": {"quant_type": "wint4", "quant_start_layer": 0,
                                                       "quant_end_layer": 2},
                               "moe_w2_quant_config": {"quant_type": "wint2", "quant_granularity": "pp_acc",
                                                       "quant_group_size": 64, "quant_start_layer": 3,
                                                       "quant_end_layer": 5}}}
    config = WInt2Config.from_config(qc)
    assert config.dense_quant_type == "wint8"            # FastDeploy's code reads dense_quant_config
    assert [config.method_for_moe_layer(i) for i in range(6)] == ["wint4"] * 3 + ["wint2"] * 3
    with pytest.raises(ValueError, match="layer 6 is in no w4 / w2 layer range"):
        config.method_for_moe_layer(6)
    default = WInt2Config.from_config({"quantization": "wint2"})
    assert default.dense_quant_type == "wint8" and default.method_for_moe_layer(6) == "wint4"
    assert default.method_for_moe_layer(7) == "wint2"
    regex = WInt2Config.from_config({"quantization": "wint2", "dense_wint2_modules": [r"re:.*\.1\.mlp"]})
    assert regex.is_wint2_module("model.layers.1.mlp.down_proj")
    assert not regex.is_wint2_module("model.layers.0.mlp.down_proj")


@pytest.mark.parametrize("update, message", [
    ({"dense_quant_type": "wint3"}, "dense_quant_type 'wint3' is not one of"),
    ({"moe_quant_type": "w4w4"}, "moe_quant_type 'w4w4' is not supported"),
    ({"dense_wint2_modules": "mlp"}, "dense_wint2_modules must be a list"),
    ({"dense_wint2_modules": ["re:(["]}, "not a valid regex"),
    ({"dense_wint4_modules": "mlp"}, "dense_wint4_modules must be a list"),
    ({"dense_wint4_modules": ["re:(["]}, "dense_wint4_modules entry .* is not a valid regex"),
    ({"moe_quant_config": {"moe_w4_quant_config": {"quant_end_layer": 9}}}, "overlap"),
    ({"moe_quant_config": {"moe_w2_quant_config": {"quant_start_layer": "7"}}},
     "moe_w2_quant_config: quant_start_layer must be a non-negative integer"),
    ({"moe_quant_config": {"moe_w2_quant_config": {"quant_type": "wint4"}}}, "quant_type must be 'wint2'"),
])
def test_config_errors(update, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        WInt2Config.from_config({"quantization": "wint2", **update}, source="cfg")


def test_wint2_on_float_checkpoint_names_the_writer(tiny_llama_dir):
    with pytest.raises(ValueError, match="WINT2 is an offline format.*python -m calib.wint2.writer"):
        LLM(str(tiny_llama_dir), quantization="wint2", max_model_len=64)


def test_missing_tensor_and_partial_fused_match(tiny_llama_dir, wint2_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in wint2_dir.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["model.layers.0.mlp.up_proj.code_zp"]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match="missing tensor 'model.layers.0.mlp.up_proj.code_zp'"):
        LLM(str(broken), max_model_len=64)
    partial = tmp_path / "partial"
    write_wint2_checkpoint(tiny_llama_dir, partial, dense_wint2_modules=("mlp.gate_proj",))
    with pytest.raises(ValueError, match="gate_up_proj: dense_wint2_modules matches only some fused shards"):
        LLM(str(partial), max_model_len=64)


def test_writer_cli(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    writer_main(["--model_path", str(tiny_llama_dir), "--save_directory", str(out),
                 "--dense_wint2_modules", "mlp.down_proj", "--dense_quant_type", "wint4"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 * 7 + 2                      # 7 Linears per layer, two means
    assert lines[-2].startswith("mean relative error wint2:") and 0.2 < float(lines[-2].split()[-1]) < 0.4
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["dense_quant_type"] == "wint4" and qc["dense_wint2_modules"] == ["mlp.down_proj"]
    assert (out / "tokenizer.json").is_file()


@pytest.mark.slow
def test_smollm2_wint2_perplexity(tmp_path):
    """The writer's plain encoding (defaults) of SmolLM2's MLP to WINT2, attention wint8.
    Measured: float 27.77; this checkpoint 3699 (133x float: 2 bits on every MLP weight of a 135M
    model without calibration breaks it). For comparison (MLP only, same tokens): plain 2-bit RTN
    per 64 gives 18343 (transformers), the encoder with an MSE-optimal rms-based start 24195, with
    three code_scales per column 18010. The calibrated writer (GPTQ, tuning) does far better."""
    from ascend_llm.eval.perplexity import perplexity
    text = DATA.read_text() if DATA.exists() else pytest.skip(f"{DATA} not found")
    out = tmp_path / "smollm2_wint2"
    report = write_wint2_checkpoint("smollm2-135m-instruct", out)
    assert 0.3 < report.mean_error("wint2") < 0.4 and report.mean_error("wint8") < 0.02
    llm = LLM(str(out), max_model_len=1100, kv_cache_memory_gb=0.25)
    ids = llm.get_tokenizer().encode(text)[:1024]
    result = perplexity(llm, ids, window=1024)
    assert result.num_scored == 1023
    assert 27.77 * 10 < result.perplexity < 18343        # broken vs float, better than plain RTN


def test_dense_wint4_modules_write_and_load(tiny_llama_dir, tmp_path, float_run):
    """First / last layer down_proj wint4 (dense_wint4_modules), other MLP Linears WINT2,
    attention wint8: the tensors, the config and a load that stays close to float."""
    out = tmp_path / "w4ends"
    wint2 = ("mlp.gate_proj", "mlp.up_proj", r"re:model\.layers\.(?!0\.)\d+\.mlp\.down_proj$")
    report = write_wint2_checkpoint(tiny_llama_dir, out, wint2, dense_wint4_modules=(r"re:.*\.0\.mlp\.down_proj$",))
    kinds = {module: kind for module, kind, _ in report.modules}
    assert kinds["model.layers.0.mlp.down_proj"] == "wint4" and kinds["model.layers.1.mlp.down_proj"] == "wint2"
    assert kinds["model.layers.0.self_attn.q_proj"] == "wint8" and kinds["model.layers.0.mlp.up_proj"] == "wint2"
    tensors = load_file(str(out / "model.safetensors"))
    down = "model.layers.0.mlp.down_proj"
    assert tensors[f"{down}.weight"].dtype == torch.uint8 and tensors[f"{down}.weight"].shape == (64, 48)
    assert f"{down}.quant_weight" not in tensors
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    config = WInt2Config.from_config(qc)
    assert qc["dense_wint4_modules"] == [r"re:.*\.0\.mlp\.down_proj$"]
    assert config.dense_bits(down) == 4 and config.dense_bits("model.layers.1.self_attn.o_proj") == 8
    _, lps, _ = _run(out)
    assert float((lps - float_run[1]).abs().mean()) < 0.5
