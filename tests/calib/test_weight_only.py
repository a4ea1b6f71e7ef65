"""Weight-only int4 calibration (calib/weight_only.py): `python -m calib --w_bit 4 --a_bit 16
--group_size g --w_method MinMax|GPTQ [--w_sym false] [--save_format ...]`.

- the written W4A16 checkpoint loads in the runtime from both formats (msModelSlim ascendV1 and
  compressed-tensors pack-quantized) and computes the dequantized weights' logits;
- GPTQ beats round-to-nearest on every layer's output error (same scales);
- a singular / indefinite Hessian gives finite codes with the raised dampening reported;
- bad options fail with a message naming the option (and, for a group size, the layer and the
  sizes that work).
The real-model quality bound is in test_smollm2_quality.py (slow).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from calib.cli import main
from calib.convert.read_compressed_tensors import read_compressed_tensors
from calib.gptq import output_error
from calib.weight_only import GPTQ_DAMP, gptq_codes, make_grid, round_to_nearest
from tests.calib.test_cli import base_args, run_cli
from tests.quant.peer_fixtures import build_dir, prefill_logits

PROMPT = [5, 17, 42, 8, 99, 3, 64, 21, 7, 150, 33, 12]


def _calibrate(capsys, model_dir: Path, out: Path, *flags: str) -> dict:
    code, _, err = run_cli(capsys, *base_args(model_dir, out), "--w_bit", "4", "--a_bit", "16",
                           "--quiet", *flags)
    assert code == 0, err
    return json.loads((out / "calib_report.json").read_text())


def _dequantized_hf_logits(model_dir: Path, ckpt: Path) -> torch.Tensor:
    """The float HF model with the checkpoint's float tensors (smoothed norms) and every Linear
    replaced by its dequantized weights (read back with the converter's reader, independently
    of the runtime's loaders)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    neutral = read_compressed_tensors(ckpt)
    model.load_state_dict({k: v.float() for k, v in neutral.floats.items()}, strict=False)
    modules = dict(model.named_modules())
    for name, linear in neutral.linears.items():
        n, k = linear.weight.shape
        g = linear.group_size or k
        scale = linear.weight_scale.reshape(n, -1).repeat_interleave(g, dim=1)
        zero = 0 if linear.weight_zero_point is None else \
            linear.weight_zero_point.reshape(n, -1).float().repeat_interleave(g, dim=1)
        modules[name].weight.data = (linear.weight.float() - zero) * scale
    with torch.inference_mode():
        return model(torch.tensor([PROMPT])).logits[0].float()


@pytest.mark.parametrize("sym,smooth", [("true", []), ("false", ["--anti_method", "m3"])])
def test_w4a16_gptq_loads_in_the_runtime_from_both_formats(tiny_llama_dir, tmp_path, capsys, sym, smooth):
    runtime = {}
    for fmt in ("ascendv1", "compressed-tensors"):
        out = tmp_path / fmt
        report = _calibrate(capsys, tiny_llama_dir, out, "--group_size", "32", "--w_method", "GPTQ",
                            "--w_sym", sym, "--save_format", fmt, *smooth)
        assert (report["anti_outlier"] is not None) == bool(smooth)
        summary = report["weight_only"]
        assert report["model_quant_type"] == "W4A16" and summary["group_size"] == 32
        assert summary["mean_output_error_written"] < summary["mean_output_error_rtn"]
        config, model = build_dir(out)
        runtime[fmt] = prefill_logits(model, config, PROMPT, torch.float32)
    description = json.loads((tmp_path / "ascendv1" / "quant_model_description.json").read_text())
    assert description["group_size"] == 32
    assert description["model.layers.0.mlp.down_proj.weight"] == "W4A16"
    assert description["lm_head.weight"] == "FLOAT"
    groups = json.loads((tmp_path / "compressed-tensors" / "config.json").read_text())[
        "quantization_config"]["config_groups"]
    weights = next(iter(groups.values()))["weights"]
    assert (weights["num_bits"], weights["strategy"], weights["group_size"], weights["symmetric"]) == \
        (4, "group", 32, sym == "true")
    reference = _dequantized_hf_logits(tiny_llama_dir, tmp_path / "compressed-tensors")
    assert float((runtime["ascendv1"] - runtime["compressed-tensors"]).abs().max()) < 1e-4
    assert float((runtime["compressed-tensors"] - reference).abs().max()) < 1e-3


def _correlated_inputs(k: int, tokens: int = 512, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen) / k ** 0.5 + torch.eye(k)
    scales = torch.logspace(-1, 1, k)[torch.randperm(k, generator=gen)]
    return (torch.randn(tokens, k, generator=gen) * scales) @ mix                 # [T, k]


@pytest.mark.parametrize("group_size,sym", [(0, True), (32, True), (64, False)])
def test_gptq_beats_round_to_nearest_on_layer_output_error(group_size, sym):
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(48, 128, generator=gen)
    x = _correlated_inputs(128)
    hessian = (x.T @ x).double()
    grid = make_grid(weight, 4, group_size, sym)
    rtn, (gptq, damp) = round_to_nearest(weight, grid), gptq_codes(weight, grid, hessian)
    assert damp == GPTQ_DAMP
    assert int(gptq.min()) >= -8 and int(gptq.max()) <= 7
    err_rtn = output_error(weight, grid.dequantize(rtn), hessian)
    err_gptq = output_error(weight, grid.dequantize(gptq), hessian)
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)


def test_indefinite_hessian_raises_the_dampening_and_stays_finite():
    weight = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))
    singular = torch.zeros(16, 16, dtype=torch.float64)                            # no input seen
    grid = make_grid(weight, 4, 8, True)
    codes, damp = gptq_codes(weight, grid, singular)
    assert damp == GPTQ_DAMP and torch.equal(codes, round_to_nearest(weight, grid))
    indefinite = torch.ones(16, 16, dtype=torch.float64) * 2 - torch.eye(16, dtype=torch.float64)
    codes, damp = gptq_codes(weight, grid, indefinite)
    assert damp > GPTQ_DAMP and bool(torch.isfinite(codes).all())


@pytest.mark.parametrize("flags,message", [
    (["--w_bit", "4", "--a_bit", "8"], "--w_bit 4 --a_bit 8: 4-bit weights are weight-only here (W4A16); "
                                       "pass --a_bit 16"),
    (["--w_bit", "4", "--a_bit", "16", "--w_method", "HQQ"], "--w_method HQQ: HQQ (half-quadratic"),
    (["--w_bit", "4", "--a_bit", "16", "--w_method", "awq"], "--w_method: unknown method 'awq'"),
    (["--w_bit", "4", "--a_bit", "16", "--group_size", "64"],
     "--group_size 64: does not divide the input dim k=96 of model.layers.0.mlp.down_proj; group sizes "
     "that divide every Linear's input dim ([64, 96]): 8, 16, 32"),
    (["--w_bit", "4", "--a_bit", "16", "--save_format", "gguf"], "--save_format: expected one of"),
    (["--w_bit", "8", "--a_bit", "8", "--w_method", "GPTQ", "--mixed_format"],
     "--w_method GPTQ with --mixed_format: not implemented"),
])
def test_bad_weight_only_options_exit_2(tiny_llama_dir, tmp_path, capsys, flags, message):
    code, _, err = run_cli(capsys, *base_args(tiny_llama_dir, tmp_path / "out"), *flags)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


# SmolLM2-135M-Instruct, served by the runtime: issue 28 target 4 (W4A16 <= 1.10x float) with
# the `w4a16_gptq_g64` recipe. Its hidden size 576 is not a multiple of 128, so group 128 is
# refused (naming the layer and the sizes that work, as compressed-tensors' own quantizer raises
# for it). To stay within the CI budget: GPTQ on 8 x 512 calibration tokens (the benchmark: 32 x
# 512), perplexity on the first 1024 tokens of each eval text (the benchmark: 16384). Measured
# 2026-12-08 (AMD EPYC, 1 thread, loaded host): 1.126x / 1.065x; the first 1024 tokens of the
# Tempest are the hardest part of it (g192 scored 1.179x there against 1.149x on 16k). The bound
# is the 1.10x target scaled for the 4x smaller calibration set and 16x fewer evaluation tokens:
# the measured worst text plus 0.035 slack for thread-count / kernel rounding.
SMOLLM2_BOUND = 1.16


@pytest.mark.slow
def test_smollm2_w4a16_gptq_g64_within_target_on_both_texts(tmp_path):
    from tests.calib.test_smollm2_quality import eval_ids, served_perplexity
    from ascend_llm.loader.resolve import resolve_model_path
    from calib.config import build_config
    from calib.config import CalibError
    from calib.pipeline import run_calibration
    from tests.shared_data import CALIB_PROSE, EVAL_PARADISE, EVAL_TEMPEST

    model_dir = Path(resolve_model_path("smollm2-135m-instruct"))
    values = {"model_path": "smollm2-135m-instruct", "calib_file": str(CALIB_PROSE), "progress": False,
              "num_samples": 8}
    with pytest.raises(CalibError, match="--group_size 128: does not divide the input dim k=576 of "
                                         "model.layers.0.self_attn.q_proj.*64, 96, 192"):
        run_calibration(build_config({**values, "recipe": "w4a16_gptq_g128", "save_directory": str(tmp_path / "g128")}))
    out = tmp_path / "g64"
    report = run_calibration(build_config({**values, "recipe": "w4a16_gptq_g64", "save_directory": str(out)}))
    summary = report.weight_only
    assert summary["group_size"] == 64 and summary["mean_output_error_written"] < 0.8 * summary["mean_output_error_rtn"]
    ratios = {}
    for text in (EVAL_TEMPEST, EVAL_PARADISE):
        ids = eval_ids(model_dir, 1024, text)
        float_ppl, ppl = served_perplexity(model_dir, ids), served_perplexity(out, ids)
        ratios[text.name] = ppl / float_ppl
    print("W4A16 GPTQ g64 / float:", ratios)
    assert all(1.0 < r <= SMOLLM2_BOUND for r in ratios.values()), ratios
