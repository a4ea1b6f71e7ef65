"""FastDeploy pre-quantized checkpoints load as FastDeploy reads them; vLLM fp8 `modules_to_not_convert`.

What FastDeploy reads (PaddlePaddle/FastDeploy develop, read 2026-12-07):
- fastdeploy/model_executor/layers/linear.py, LinearBase.__init__: when the model is quantized the
  keys are `{prefix}.quant_weight` and `{prefix}.weight_scale` (not `{prefix}.weight`);
- .../layers/quantization/weight_only.py, WeightOnlyLinearMethod.create_weights: the parameter is
  int8 [n, k] (wint8) / [n / 2, k] (wint4), `weight_scale` [n] in the model dtype;
  GPUWeightOnlyLinearMethod.process_prequanted_weights copies `quant_weight` as is, and `apply`
  hands it to Paddle's `weight_only_linear`: the bytes are `weight_quantize`'s arch-specific CUTLASS
  layout (Paddle paddle/phi/kernels/impl/weight_quantize_kernel_gpu_impl.h, one layout for arch
  75-90). WINT8Config / WINT4Config.from_config read only `is_checkpoint_bf16`;
- .../layers/quantization/mix_quant.py, MixQuantConfig: `is_permuted` defaults to True;
- .../layers/quantization/__init__.py, parse_quant_config: a quantization_config without
  `is_quantized` is pre-quantized;
- .../layers/quantization/block_wise_fp8.py, BlockWiseFP8Config.from_config: `weight_block_size`
  (default [128, 128]) and `is_quantized`.
And vLLM vllm/model_executor/layers/quantization/fp8.py, Fp8Config.from_config: `ignored_layers`, or
`modules_to_not_convert` when that is empty; utils/quant_utils.py is_layer_skipped: exact prefix.

Fixtures: tests/fixtures/peer_checkpoints/fastdeploy/ -- `paddle_weight_quantize` holds bytes written
by paddlepaddle's own `weight_quantize` (scripts/peer_paddle_weight_quantize.py); the llama_* cases
are written by our scripts/make_fastdeploy_fixtures.py from the code above (FastDeploy needs a GPU),
with their reference logits (float model; model with the dequantized weights) from transformers.

Bounds:
- wint8 / wint4 vs `dequant_logits`: our model holds exactly the dequantized weights (codes * bf16
  scale), so only float32 summation order differs: measured max |diff| ~1e-6; atol 1e-4.
- vs the float model (the format's rounding): |w - q s| <= amax (1 / (2 qmax) + 2^-9) per channel
  (half a step, plus the bf16 scale), i.e. <= 0.6% (wint8) / 7.3% (wint4) of the channel's amax;
  measured max |logit diff| 0.039 (wint8) / 0.80 (wint4: 15 levels on a tiny random model) on
  logits of magnitude ~2.2; bounds 0.1 / 1.6. It is quantized: both move them by more than 0.02.
- block_wise_fp8: the e4m3 weight bytes and block scales are the checkpoint's (asserted); activations
  are also e4m3 per token per 32 channels (relative rounding up to 2^-4) while the reference keeps
  them float: measured max |diff| 0.12 vs `dequant_logits`; bound 0.3.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ascend_llm.layers.linear import ColumnParallelLinear, RowParallelLinear
from ascend_llm.numerics import cutlass_weight_layout as C
from ascend_llm.numerics import primitives as P
from ascend_llm.quant.fp8 import BlockWiseFp8Config
from ascend_llm.quant.fp8_checkpoint import BlockFp8CheckpointLinearMethod, Fp8CheckpointConfig
from ascend_llm.quant.registry import get_quant_config
from ascend_llm.quant.unquantized import UnquantizedLinearMethod
from ascend_llm.quant.weight_only import (PrequantWeightOnlyLinearMethod, WeightOnlyCheckpointConfig,
                                          weight_only_config_from_checkpoint)
from ascend_llm.quant.weight_only_layout import WeightOnlyLayout
from tests.quant.peer_fixtures import batch_logits, build_dir, copy_fixture
from tests.quant.prequant_writers import convert_linears, write_autofp8, write_fastdeploy_weight_only

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "peer_checkpoints" / "fastdeploy"
GOLDEN = FIXTURES / "paddle_weight_quantize" / "golden.npz"
EXACT_ATOL = 1e-4
FLOAT_BOUNDS = {"llama_wint8": 0.1, "llama_wint4": 1.6}
FP8_ACT_BOUND = 0.3








def _edit(model_dir: Path, rename: tuple[str, str] | None = None, **quant_updates: object) -> None:
    """Rename checkpoint tensor suffixes and update quantization_config in place."""
    if rename is not None:
        path = model_dir / "model.safetensors"
        tensors = {k.replace(*rename): v for k, v in load_file(str(path)).items()}
        save_file(tensors, str(path), metadata={"format": "pt"})
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"].update(quant_updates)
    config_path.write_text(json.dumps(config))


def _round_half_away(v: torch.Tensor) -> torch.Tensor:
    return torch.sign(v) * torch.floor(v.abs() + 0.5)


# ---------------------------------------------------------------- the CUTLASS layout vs Paddle's bytes

@pytest.mark.parametrize("bits", [8, 4])
def test_layout_is_paddle_weight_quantize_bytes(bits):
    golden = np.load(GOLDEN)
    name = f"wint{bits}"
    x = torch.from_numpy(golden["x"].astype(np.float32)).t()                        # [n, k]
    out = torch.from_numpy(golden[f"{name}_arch80_out"])                              # container
    scale = torch.from_numpy(golden[f"{name}_arch80_scale"].astype(np.float32))      # [n]
    n, k = x.shape
    qmax = P.int_qmax(bits)
    want = _round_half_away(x / scale[:, None]).clamp(-qmax, qmax).to(torch.int8)    # Paddle's codes
    assert tuple(out.shape) == C.container_shape(k, n, bits)
    assert torch.equal(C.unpermute(out, k, n, bits), want)
    assert torch.equal(C.permute(want, bits), out)
    # one layout for arch 75-90 (Paddle takes one branch); Volta's differs and is not read
    assert np.array_equal(golden[f"{name}_arch90_out"], golden[f"{name}_arch80_out"])
    assert not np.array_equal(golden[f"{name}_arch70_out"], golden[f"{name}_arch80_out"])


def test_layout_refuses_shapes_without_one():
    layout = WeightOnlyLayout(8, permuted=True)
    with pytest.raises(ValueError, match=r"m.down_proj.quant_weight: FastDeploy's CUTLASS wint8 layout "
                                         r"\(is_permuted: true .*k a multiple of 64.*k=96"):
        layout.to_kernel(None, torch.zeros(64, 96, dtype=torch.int8), "m.down_proj.quant_weight")
    with pytest.raises(ValueError, match=r"expected a 2-D int8 wint4 tensor"):
        WeightOnlyLayout(4, permuted=True).to_kernel(None, torch.zeros(8, 64), "m.quant_weight")


# ---------------------------------------------------------------- the fixtures load and compute

@pytest.mark.parametrize("case", ["llama_wint8", "llama_wint4", "llama_block_wise_fp8"])
def test_fixture_loads_and_matches_its_dequantized_model(case):
    model_dir = FIXTURES / case
    manifest = json.loads((model_dir / "MANIFEST.json").read_text())
    assert "NOT written by FastDeploy" in manifest["tool"]
    ref = load_file(str(model_dir / "reference" / "logits.safetensors"))
    config, model = build_dir(model_dir)
    got = batch_logits(model, config, ref["input_ids"])
    down = model.model.layers[0].mlp.down_proj
    if case == "llama_block_wise_fp8":
        stored = load_file(str(model_dir / "model.safetensors"))
        assert isinstance(down.quant_method, BlockFp8CheckpointLinearMethod)
        assert down.weight.dtype == torch.float8_e4m3fn and down.weight_block_size == (32, 32)
        assert torch.equal(down.weight.view(torch.uint8),
                           stored["model.layers.0.mlp.down_proj.weight"].view(torch.uint8))
        assert torch.equal(down.weight_scale_inv, stored["model.layers.0.mlp.down_proj.weight_scale_inv"])
        assert float((got - ref["dequant_logits"]).abs().max()) < FP8_ACT_BOUND
        return
    bits = 8 if case.endswith("8") else 4
    assert isinstance(down.quant_method, PrequantWeightOnlyLinearMethod)
    assert down.quant_method.layout == WeightOnlyLayout(bits, permuted=True)     # FastDeploy's default
    assert down.weight.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert tuple(down.weight.shape) == ((64, 128) if bits == 8 else (64, 64))
    assert not hasattr(down, "quant_weight")
    torch.testing.assert_close(got, ref["dequant_logits"], atol=EXACT_ATOL, rtol=0)
    gap = float((got - ref["float_logits"]).abs().max())
    assert 0.02 < gap < FLOAT_BOUNDS[case]


def test_fastdeploy_defaults_are_read_as_fastdeploy_does():
    config = weight_only_config_from_checkpoint({"quantization": "wint8"}, {}, "cfg")
    assert isinstance(config, WeightOnlyCheckpointConfig) and config.is_permuted     # mix_quant default
    online = weight_only_config_from_checkpoint({"quantization": "wint4", "is_checkpoint_bf16": True}, {}, "cfg")
    assert online.get_name() == "wint4" and not isinstance(online, WeightOnlyCheckpointConfig)
    with pytest.raises(ValueError, match="is_permuted must be true or false"):
        weight_only_config_from_checkpoint({"quantization": "wint8", "is_permuted": "yes"}, {}, "cfg")


def test_row_major_tensor_under_the_default_is_refused_by_name(tiny_llama_dir, tmp_path):
    """A row-major export whose config omits is_permuted (FastDeploy's default: CUTLASS): refused
    naming the tensor and is_permuted (k = 96 has no CUTLASS layout; k = 64 decodes to -128)."""
    out = write_fastdeploy_weight_only(tiny_llama_dir, tmp_path / "plain", 8)
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]["is_permuted"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.\w+\.\w+\.quant_weight(\[\w+\])?: .*"
                                         r"is_permuted: true \(FastDeploy's default\)"):
        build_dir(out)
    codes = P.quantize_per_channel(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)), 8)[0]
    with pytest.raises(ValueError, match=r"m\.o_proj\.quant_weight: wint8 code -128 found when read with "
                                         r"is_permuted: true .*set quantization_config\.is_permuted: false"):
        WeightOnlyLayout(8, permuted=True).to_kernel(None, codes, "m.o_proj.quant_weight")


def test_old_weight_name_errors_clearly_unless_row_major_is_declared(tiny_llama_dir, tmp_path):
    def old_layout(module: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
        q, scale = P.quantize_per_channel(w, 8)
        return {"weight": q, "weight_scale": scale}                   # ascend-llm's earlier export

    out = convert_linears(tiny_llama_dir, tmp_path / "old", old_layout, {"quantization": "wint8"})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.\w+\.\w+\.weight(\[\w+\])?: a pre-quantized "
                                         r"wint8 checkpoint with is_permuted: true .* stores this layer as "
                                         r"'model\.layers\.0\.\w+\.\w+\.quant_weight(\[\w+\])?'.*"
                                         r"is_permuted: false"):
        build_dir(out)
    _edit(out, is_permuted=False)                                     # declared row-major: it loads
    _, model = build_dir(out)
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.int8


def test_renamed_fastdeploy_tensor_never_loads_as_garbage(tmp_path):
    """FastDeploy's CUTLASS bytes renamed to `weight` and declared row-major: the +128-biased codes
    decode to -128 where FastDeploy stored 0."""
    out = copy_fixture(FIXTURES / "llama_wint8", tmp_path)
    _edit(out, rename=(".quant_weight", ".weight"), is_permuted=False)
    with pytest.raises(ValueError, match=r"\.weight(\[\w+\])?: wint8 code -128 found when read with "
                                         r"is_permuted: false.*is_permuted: true"):
        build_dir(out)


def test_tensor_parallel_slices_after_reading_the_layout():
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(-7, 8, (64, 128), generator=gen, dtype=torch.int8)          # [n, k]
    scale = torch.rand(64, generator=gen) + 0.5
    container = C.permute(codes, 4)                                                   # [32, 128]
    config = WeightOnlyCheckpointConfig(4, is_permuted=True)
    for rank in range(2):
        row = RowParallelLinear(128, 64, quant_config=config, prefix="m.down_proj", tp_rank=rank, tp_size=2)
        col = ColumnParallelLinear(128, [64], quant_config=config, prefix="m.up_proj", tp_rank=rank, tp_size=2)
        for layer in (row, col):
            layer.quant_weight.weight_loader(layer.quant_weight, container)
            layer.weight_scale.weight_loader(layer.weight_scale, scale)
            layer.quant_method.process_weights_after_loading(layer)
        assert torch.equal(row.weight, P.pack_int4(codes[:, 64 * rank:64 * (rank + 1)]))
        assert torch.equal(col.weight, P.pack_int4(codes[32 * rank:32 * (rank + 1)]))


# ---------------------------------------------------------------- block_wise_fp8 and modules_to_not_convert

class _Config:
    def __init__(self, quantization_config: dict) -> None:
        self.quantization_config = quantization_config


def test_block_wise_fp8_config_keys(tmp_path):
    default = get_quant_config(None, _Config({"quantization": "block_wise_fp8"}))
    assert isinstance(default, Fp8CheckpointConfig) and default.weight_block_size == (128, 128)
    online = get_quant_config(None, _Config({"quantization": "block_wise_fp8", "is_quantized": False,
                                             "weight_block_size": [64, 64]}))
    assert isinstance(online, BlockWiseFp8Config) and online.block_size == (64, 64)
    paddle_dir = tmp_path / "paddle"
    paddle_dir.mkdir()
    (paddle_dir / "config.json").write_text(json.dumps({"dtype": "bfloat16", "quantization_config":
                                                        {"quantization": "block_wise_fp8"}}))
    with pytest.raises(ValueError, match=r"Paddle-format block_wise_fp8 checkpoint .* \[k, n\]"):
        get_quant_config(None, None, paddle_dir)


def test_vllm_modules_to_not_convert_keeps_layers_float(tiny_llama_dir, tmp_path):
    float_layer = "model.layers.0.mlp.down_proj"
    out = write_autofp8(tiny_llama_dir, tmp_path / "fp8", ignored_layers=[float_layer])
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    quant = config["quantization_config"]
    quant.pop("ignored_layers")
    quant["modules_to_not_convert"] = [float_layer]                   # the other spelling vLLM reads
    config_path.write_text(json.dumps(config))
    _, model = build_dir(out)
    down0, down1 = model.model.layers[0].mlp.down_proj, model.model.layers[1].mlp.down_proj
    assert isinstance(down0.quant_method, UnquantizedLinearMethod) and down0.weight.dtype == torch.float32
    assert down1.weight.dtype == torch.float8_e4m3fn
    base = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    both = Fp8CheckpointConfig.from_config({**base, "ignored_layers": ["a"], "modules_to_not_convert": ["b"]})
    empty = Fp8CheckpointConfig.from_config({**base, "ignored_layers": [], "modules_to_not_convert": ["b"]})
    assert both.ignored_layers == ("a",) and empty.ignored_layers == ("b",)    # vLLM's precedence
