"""The loaded model's weight bytes reflect the format: a tiny Llama (hidden 64, intermediate 96,
2 layers, fp32) loaded float and in each format, linear-layer bytes counted by
`calib.weight_bytes`. Codes are exactly 1/4 (int8, e4m3), 1/8 (packed int4) and 1/16
(WINT2 2-bit codes) of the fp32 weight; the scales add a known amount on top (per channel: 4 bytes
per output row, i.e. 1/k of the fp32 bytes; WINT2: a uint8 scale per 128 k and three float32 per
row). Embedding and LM head stay float and are reported separately.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ascend_llm import LLM
from calib.weight_bytes import weight_bytes
from calib.wint2.writer import write_wint2_checkpoint


def _model(model_dir: Path, quantization: str | None = None) -> torch.nn.Module:
    return LLM(str(model_dir), quantization=quantization, max_model_len=64).llm_engine.model_runner.model


def _linears(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for name, m in model.named_modules() if hasattr(m, "quant_method") and name != "lm_head"]


def _shape(linear: torch.nn.Module) -> tuple[int, int]:
    """(n, k) of the layer's float weight."""
    return sum(linear.output_sizes), linear.input_size


@pytest.fixture(scope="module")
def float_model(tiny_llama_dir):
    return _model(tiny_llama_dir)


@pytest.fixture(scope="module")
def float_bytes(float_model):
    return weight_bytes(float_model)


def test_float_model_bytes_are_four_per_weight(float_model, float_bytes):
    linear = sum(4 * n * k for n, k in map(_shape, _linears(float_model)))
    assert float_bytes.parts["linear"] == linear
    assert float_bytes.by_dtype["linear"] == {"float32": linear}
    embed = float_model.model.embed_tokens.weight
    assert float_bytes.parts["embedding"] == 4 * embed.numel()
    buffers = sum(b.numel() * b.element_size() for b in float_model.buffers())   # rotary cos/sin
    assert float_bytes.total == 4 * sum(p.numel() for p in float_model.parameters()) + buffers


# method -> (dtype of the codes, code bytes per fp32 byte, scale bytes of one [n, k] layer)
FORMATS = {
    "wint8": ("int8", 1 / 4, lambda n, k: 4 * n),
    "wint4": ("uint8", 1 / 8, lambda n, k: 4 * n),
    "fp8": ("float8_e4m3fn", 1 / 4, lambda n, k: 4),
    "block_wise_fp8": ("float8_e4m3fn", 1 / 4, lambda n, k: 4 * math.ceil(n / 128) * math.ceil(k / 128)),
}


@pytest.mark.parametrize("method", list(FORMATS))
def test_online_formats_shrink_linear_bytes(tiny_llama_dir, float_bytes, method):
    model = _model(tiny_llama_dir, method)
    got = weight_bytes(model)
    code_dtype, code_ratio, scale_bytes = FORMATS[method]
    float_linear = float_bytes.parts["linear"]
    assert got.by_dtype["linear"][code_dtype] == float_linear * code_ratio        # the codes, exactly
    scales = sum(scale_bytes(n, k) for n, k in map(_shape, _linears(model)))
    assert got.by_dtype["linear"]["float32"] == scales
    ratio = got.parts["linear"] / float_linear
    assert code_ratio < ratio < code_ratio + 1 / 64 + 1e-9                 # k >= 64: scales <= 1/k
    for part in ("embedding", "lm_head", "other"):
        assert got.parts[part] == float_bytes.parts[part], part            # stays float
    assert set(got.by_dtype["embedding"]) == {"float32"}


def test_wint2_mlp_is_one_sixteenth_plus_scales(tiny_llama_dir, tmp_path, float_model):
    out = tmp_path / "wint2"
    write_wint2_checkpoint(tiny_llama_dir, out)               # MLP WINT2, attention wint8
    model = _model(out)
    mlp = [m for m in _linears(model) if ".mlp." in m.prefix]
    assert mlp and all(hasattr(m, "quant_weight") for m in mlp)
    float_mlp = {m.prefix: 4 * n * k for m, (n, k) in zip(mlp, map(_shape, mlp))}
    for linear in mlp:
        n, k = _shape(linear)
        got = weight_bytes(linear)
        assert linear.quant_weight.dtype == torch.uint8
        assert linear.quant_weight.numel() == float_mlp[linear.prefix] / 16         # 2 bits per weight
        scales = math.ceil(k / 128) * n + 3 * 4 * n                                  # uint8 scale, 3 x fp32
        assert got.total == float_mlp[linear.prefix] / 16 + scales
        assert got.total / float_mlp[linear.prefix] <= 1 / 16 + 13 / (4 * 64) + 1e-9     # k >= 64
    assert sum(weight_bytes(m).total for m in mlp) < sum(float_mlp.values()) / 8
