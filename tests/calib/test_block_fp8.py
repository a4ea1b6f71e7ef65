"""`python -m calib.block_fp8`: GPTQ-rounded block-FP8 checkpoints in the DeepSeek layout.

Checks the GPTQ loop itself (on correlated inputs it beats round-to-nearest on output error and
stays on the e4m3 grid), the written files (tensor names, dtypes, scale shapes, config), that the
runtime loads them as block FP8 with no `quantization` argument, and the CLI's errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ascend_llm import LLM
from ascend_llm.numerics import primitives as P
from calib.block_fp8 import BlockFp8Options, convert, main, quantize_block_fp8
from calib.gptq import gptq_round, output_error
from tests.calib.test_roundtrip import float_logprobs, prose_ids, runtime_logprobs
from tests.shared_data import CALIB_PROSE

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _correlated_inputs(tokens: int, k: int, seed: int) -> torch.Tensor:
    """Activations with a few strong channels and correlated directions, like a real layer's."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(k, k, generator=g) / k ** 0.5
    x = torch.randn(tokens, k, generator=g) @ mixing + 0.3 * torch.randn(tokens, k, generator=g)
    x[:, :4] *= 20.0                                                          # outlier channels
    return x


def test_gptq_beats_round_to_nearest_on_output_error():
    torch.manual_seed(0)
    weight = torch.randn(96, 160) * 0.05                                      # [n, k], partial blocks
    x = _correlated_inputs(512, 160, seed=1)
    hessian = x.double().T @ x.double()
    q_rtn, s_rtn = quantize_block_fp8(weight, (64, 64))
    q_gptq, s_gptq = quantize_block_fp8(weight, (64, 64), hessian)
    assert q_gptq.dtype == torch.float8_e4m3fn and torch.equal(s_gptq, s_rtn)  # same block scales
    rtn = output_error(weight, P.dequantize_fp8_block(q_rtn, s_rtn, (64, 64)), hessian)
    gptq = output_error(weight, P.dequantize_fp8_block(q_gptq, s_gptq, (64, 64)), hessian)
    # measured: rtn 0.026, gptq 0.014
    assert gptq < 0.75 * rtn
    # the error bound is on real inputs too, not only through H
    y = x @ weight.T
    y_gptq = x @ P.dequantize_fp8_block(q_gptq, s_gptq, (64, 64)).T
    assert float((y_gptq - y).norm() / y.norm()) == pytest.approx(gptq, rel=1e-3)


def test_gptq_with_identity_hessian_is_round_to_nearest():
    """With uncorrelated unit inputs, error feedback has nowhere useful to go: H = I gives RTN."""
    weight = torch.randn(32, 48)
    scale = torch.full((32, 1), 0.01)
    values = gptq_round(weight, torch.eye(48, dtype=torch.float64),
                        lambda cols, first: P.fp8_cast(cols / scale).float() * scale, damp=0.0)
    assert torch.equal(values, P.fp8_cast(weight / scale).float() * scale)


def test_gptq_rejects_a_mismatched_hessian():
    with pytest.raises(ValueError, match="hessian: shape \\(8, 8\\) does not match the weight's k=16"):
        gptq_round(torch.randn(4, 16), torch.eye(8), lambda c, i: c)
    with pytest.raises(ValueError, match="hessian: holds NaN or inf"):
        gptq_round(torch.randn(4, 8), torch.full((8, 8), float("nan")), lambda c, i: c)


@pytest.fixture(scope="module")
def gptq_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bfp8") / "gptq"
    report = convert(BlockFp8Options(str(tiny_llama_dir), str(out), str(CALIB_PROSE), "gptq", (32, 32),
                                     num_samples=4, max_tokens=64, progress=False))
    assert report.layers and report.mean("written") < report.mean("rtn")
    return out


def test_checkpoint_layout(gptq_dir, tiny_llama_dir):
    tensors = load_file(str(gptq_dir / "model.safetensors"))
    source = load_file(str(next(tiny_llama_dir.glob("*.safetensors"))))
    for suffix in LINEARS:
        name = f"model.layers.1.{suffix}"
        n, k = source[f"{name}.weight"].shape
        assert tensors[f"{name}.weight"].dtype == torch.float8_e4m3fn
        assert tensors[f"{name}.weight_scale_inv"].dtype == torch.float32
        assert tensors[f"{name}.weight_scale_inv"].shape == (-(-n // 32), -(-k // 32))
    assert torch.equal(tensors["model.embed_tokens.weight"], source["model.embed_tokens.weight"])
    config = json.loads((gptq_dir / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3",
                                             "activation_scheme": "dynamic", "weight_block_size": [32, 32]}
    report = json.loads((gptq_dir / "block_fp8_report.json").read_text())
    assert report["mean_output_error_written"] < report["mean_output_error_rtn"]


def test_runtime_loads_it_as_block_fp8_close_to_float(gptq_dir, tiny_llama_dir):
    llm = LLM(str(gptq_dir), max_model_len=128)
    qkv = llm.llm_engine.model_runner.model.model.layers[0].self_attn.qkv_proj
    assert qkv.weight.dtype == torch.float8_e4m3fn and qkv.fp8_kernel.name.startswith("cpu.fp8_matmul_block")
    ids = prose_ids(tiny_llama_dir)
    float_lp, _ = float_logprobs(tiny_llama_dir, ids)
    lp, _ = runtime_logprobs(llm, ids)
    print("mean |d logprob|", float((lp - float_lp).abs().mean()))
    assert float((lp - float_lp).abs().mean()) < 0.05     # measured ~0.005


def test_cli_errors(tiny_llama_dir, tmp_path, capsys):
    assert main(["--model_path", str(tiny_llama_dir), "--save_directory", str(tmp_path / "a")]) == 2
    assert "--calib_file: GPTQ rounding needs calibration data" in capsys.readouterr().err
    assert main(["--model_path", str(tiny_llama_dir), "--save_directory", str(tmp_path / "b"),
                 "--method", "awq", "--calib_file", str(CALIB_PROSE)]) == 2
    assert "--method: 'awq' is not one of gptq, rtn" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    assert main(["--model_path", str(tiny_llama_dir), "--save_directory", str(tmp_path / "full"),
                 "--method", "rtn"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "full" / "x").read_text() == "keep me"
