"""MoFQ mixed INT8 / FP8: per-layer choice by output error, written and loaded per layer."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from ascend_llm import LLM, SamplingParams
from ascend_llm.quant.w8a8 import W8A8DynamicLinearMethod, WFp8AFp8DynamicLinearMethod
from calib.config import CalibConfig
from calib.export import VLLM_ASCEND_FP8_TYPE
from calib.mixed_format import choose_formats
from calib.model_spec import LinearGroup
from calib.pipeline import run_calibration
from tests.shared_data import CALIB_PROSE

CALIB_FILE = str(CALIB_PROSE)
HEAVY = "model.layers.0.mlp.down_proj"


def column_scales(k: int, seed: int) -> torch.Tensor:
    """Log-uniform per-input-channel magnitudes over two decades (0.1 .. 10), [k]."""
    return 10 ** (torch.rand(k, generator=torch.Generator().manual_seed(seed)) * 2 - 1)


def test_heavy_tailed_weights_choose_fp8_and_gaussian_int8():
    """Weights whose column magnitudes span decades (what smoothing folds into a layer), with
    inputs scaled inversely so every column matters: int8's per-row grid drowns the small
    columns, fp8's relative precision keeps them."""
    gen = torch.Generator().manual_seed(0)
    s = column_scales(64, 1)
    weights = {"gauss": torch.randn(48, 64, generator=gen) * 0.05,
               "heavy": torch.randn(48, 64, generator=gen) * 0.05 * s}
    groups = [LinearGroup("g_gauss", ("gauss",), 0), LinearGroup("g_heavy", ("heavy",), 0)]
    x = torch.randn(128, 64, generator=gen)
    choices = choose_formats(groups, lambda n: (weights[n], None), {"g_gauss": x, "g_heavy": x / s},
                             progress=False)
    assert choices["g_gauss"].quant_type == "W8A8_DYNAMIC"
    assert choices["g_heavy"].quant_type == "WFP8AFP8_DYNAMIC"
    heavy = choices["g_heavy"].errors
    assert heavy["WFP8AFP8_DYNAMIC"] < 0.2 * heavy["W8A8_DYNAMIC"]


@pytest.fixture(scope="module")
def heavy_model_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama with layer 0's up_proj rows divided and down_proj columns multiplied by
    log-uniform scales: the same float function, heavy-tailed down_proj weight columns."""
    directory = tmp_path_factory.mktemp("heavy_llama")
    for f in Path(tiny_llama_dir).iterdir():
        (directory / f.name).write_bytes(f.read_bytes())
    state = load_file(str(directory / "model.safetensors"))
    s = column_scales(state[f"{HEAVY}.weight"].shape[1], 2)                        # [intermediate]
    state[f"{HEAVY}.weight"] = state[f"{HEAVY}.weight"] * s[None, :]
    up = "model.layers.0.mlp.up_proj.weight"
    state[up] = state[up] / s[:, None]
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


@pytest.fixture(scope="module")
def mixed_dir(heavy_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("mixed")
    run_calibration(CalibConfig(model_path=str(heavy_model_dir), save_directory=str(out),
                                calib_file=CALIB_FILE, num_samples=3, max_tokens=48, progress=False,
                                mixed_format=True))
    return out


def test_mixed_description_and_tensors(mixed_dir):
    desc = json.loads((mixed_dir / "quant_model_description.json").read_text())
    tensors = load_file(str(mixed_dir / "quant_model_weights.safetensors"))
    fp8 = VLLM_ASCEND_FP8_TYPE       # vllm-ascend's name for msModelSlim's WFP8AFP8_DYNAMIC
    assert desc[f"{HEAVY}.weight"] == desc[f"{HEAVY}.weight_scale"] == fp8
    n, k = 64, 96
    assert tensors[f"{HEAVY}.weight"].dtype == torch.float8_e4m3fn
    assert tuple(tensors[f"{HEAVY}.weight"].shape) == (n, k)
    assert tensors[f"{HEAVY}.weight_scale"].dtype == torch.float32
    assert tuple(tensors[f"{HEAVY}.weight_scale"].shape) == (n, 1)
    # vllm-ascend's method declares a weight_offset [n, 1]
    assert torch.equal(tensors[f"{HEAVY}.weight_offset"], torch.zeros(n, 1))
    assert desc["model.layers.0.self_attn.q_proj.weight"] == "W8A8_DYNAMIC"   # gaussian: INT8
    # msModelSlim's priority (AscendV1Saver.QUANT_TYPE_PRIORITY): FP8 ranks above the int8 types
    assert desc["model_quant_type"] == fp8
    report = json.loads((mixed_dir / "calib_report.json").read_text())
    row = next(r for r in report["layers"] if r["name"] == HEAVY)
    assert row["format_errors"]["WFP8AFP8_DYNAMIC"] < row["format_errors"]["W8A8_DYNAMIC"]


def test_mixed_checkpoint_loads_and_matches_float(mixed_dir, heavy_model_dir):
    llm = LLM(str(mixed_dir), max_model_len=128, enforce_eager=True)
    layer = llm.llm_engine.model_runner.model.model.layers[0]
    assert isinstance(layer.mlp.down_proj.quant_method, WFp8AFp8DynamicLinearMethod)
    assert isinstance(layer.self_attn.qkv_proj.quant_method, W8A8DynamicLinearMethod)
    text = json.loads(Path(CALIB_FILE).read_text().splitlines()[20])["text"]
    ids = AutoTokenizer.from_pretrained(heavy_model_dir)(text)["input_ids"][:60]
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    entries = llm.generate(prompt_token_ids=[ids], sampling_params=params, use_tqdm=False)[0].prompt_logprobs
    quant = torch.tensor([entries[i + 1][ids[i + 1]].logprob for i in range(len(ids) - 1)])
    model = AutoModelForCausalLM.from_pretrained(heavy_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], dim=-1)
    ref = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    # measured mean |d logprob| 0.017 (2026-11-23); bound with headroom
    assert 0 < float((quant - ref).abs().mean()) < 0.05
