"""GPTQ WINT2 writer options: act-order (calib/wint2/act_order.py), per-row code_scale search
(calib/wint2/code_search.py), held-out calibration rows and EncoderOptions.

Random layer of test_wint2_gptq._layer with [32, 192] weights and 1024 tokens, seeds 0 / 1,
measured sums of the damped row losses: order none 7292 / 7802, group 7098 / 6876, quad 6522 /
6509; best of the three code_scale candidates (order none) 6640 / 7205. Bounds: group <= 0.99 x
none, quad <= group (by construction, per row), code_scale search <= 0.95 x none and < every
single candidate per row.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from ascend_llm import LLM
from ascend_llm.layers.linear import MergedColumnParallelLinear
from ascend_llm.numerics import wint2 as L
from ascend_llm.quant.wint2 import WInt2Config
from calib.wint2 import encode as E
from calib.wint2 import gptq as G
from calib.wint2.act_order import encode_act_order, group_order, quad_order
from calib.wint2.calibration import CalibSpec, split_calibration_ids
from calib.wint2.code_search import encode_best_code_scale, merge_rows
from calib.wint2.gptq_writer import EncoderOptions
from calib.wint2.refine import refine_wint2
from calib.wint2.writer import main as writer_main
from tests.calib.wint2.test_wint2_gptq import _layer
from tests.calib.wint2.word_text import word_text_file


def _exact_loss(w: torch.Tensor, tensors: L.Wint2Tensors, h: torch.Tensor) -> torch.Tensor:
    hd, dead = G.damped(h, G.DEFAULT_DAMP)
    d = (G.dequantize(tensors) - w.masked_fill(dead, 0.0)).double()          # dead columns: target 0
    return ((d @ hd) * d).sum(1)


@pytest.fixture(scope="module", params=[0, 1])
def small_layer(request):
    w, _, h = _layer(n=32, k=192, m=1024, seed=request.param)
    return w, h


def test_orders_keep_quads_and_groups_whole():
    k = 64 * 3 + 36                                                          # a partial last group
    h = torch.diag(torch.rand(k, generator=torch.Generator().manual_seed(2)) + 0.1)
    strength = torch.diagonal(h).view(-1, 4).sum(1)
    for perm in (group_order(h), quad_order(h)):
        assert sorted(perm.tolist()) == list(range(k))
        quads = perm.view(-1, 4)
        assert bool((quads - quads[:, :1] == torch.arange(4)).all()) and bool((quads[:, 0] % 4 == 0).all())
    assert bool((strength[quad_order(h)[0::4] // 4].diff() <= 0).all())     # decreasing quad sums
    perm = group_order(h)
    for g in range(3):                                                       # full groups contiguous
        block = perm[64 * g:64 * (g + 1)]
        assert len(set((block // 64).tolist())) == 1
        assert bool((strength[block[0::4] // 4].diff() <= 0).all())
    assert bool((perm[192:] >= 192).all())                                   # partial group last
    sums = [float(torch.diagonal(h)[perm[64 * g:64 * (g + 1)]].sum()) for g in range(3)]
    assert sums == sorted(sums, reverse=True)


def test_act_order_lowers_loss_and_keeps_exact_row_losses(small_layer):
    w, h = small_layer
    results = {order: encode_act_order(w, h, order) for order in ("none", "group", "quad")}
    for order, r in results.items():
        assert {n: tuple(getattr(r.tensors, n).shape) for n in L.TENSOR_NAMES} == L.expected_shapes(192, 32)
        torch.testing.assert_close(r.row_loss.double(), _exact_loss(w, r.tensors, h), rtol=2e-3, atol=1e-6)
    loss = {order: float(r.row_loss.sum()) for order, r in results.items()}
    assert loss["group"] < 0.99 * loss["none"], loss
    assert bool((results["quad"].row_loss <= results["group"].row_loss).all()) and loss["quad"] < loss["group"]
    assert torch.equal(results["quad"].tensors.weight_scale, results["group"].tensors.weight_scale)


def test_act_order_partial_group_dead_column_and_bad_mode():
    w, _, h = _layer(n=8, k=100, m=400, seed=3)
    h[5, :], h[:, 5] = 0.0, 0.0
    for order in ("group", "quad"):
        r = encode_act_order(w, h, order, scale_dtype=torch.bfloat16)
        deq = G.dequantize(r.tensors)
        assert torch.isfinite(deq).all() and tuple(r.tensors.weight_scale.shape) == (1, 8)
        torch.testing.assert_close(r.row_loss.double(), _exact_loss(w, r.tensors, h), rtol=2e-3, atol=1e-6)
    with pytest.raises(ValueError, match="act_order: 'random' is not one of"):
        encode_act_order(w, h, "random")


def test_code_scale_search_is_per_row_and_loads(small_layer):
    w, h = small_layer
    single = [G.encode_wint2_hessian(w, h, code_scale=cs) for cs in E.CODE_SCALE_CANDIDATES]
    best = encode_best_code_scale(lambda cs: G.encode_wint2_hessian(w, h, code_scale=cs), E.CODE_SCALE_CANDIDATES)
    assert len(best.tensors.code_scale.unique()) == 3                       # rows really differ
    assert all(bool((best.row_loss <= s.row_loss).all()) for s in single)
    assert float(best.row_loss.sum()) < 0.95 * float(single[0].row_loss.sum())
    torch.testing.assert_close(best.row_loss.double(), _exact_loss(w, best.tensors, h), rtol=2e-3, atol=1e-6)
    for cs, zp in zip(best.tensors.code_scale.tolist(), best.tensors.code_zp.tolist()):
        assert zp == E.code_zp_for(cs) and cs * 256 == int(cs * 256)
    refined = refine_wint2(w, h, best.tensors, passes=1)                     # mixed codebooks
    assert bool((refined.row_loss <= best.row_loss * (1 + 1e-4)).all())
    torch.testing.assert_close(refined.row_loss.double(), _exact_loss(w, refined.tensors, h), rtol=2e-3, atol=1e-6)
    config = WInt2Config(dense_wint2_modules=("mlp.gate_proj", "mlp.up_proj"),
                         packed_modules={"gate_up_proj": ("gate_proj", "up_proj")})
    layer = MergedColumnParallelLinear(192, [32, 32], bias=False, quant_config=config,
                                       prefix="model.layers.0.mlp.gate_up_proj")
    for index, t in enumerate((refined.tensors, single[1].tensors)):
        for name, tensor in t.as_dict().items():
            getattr(layer, name).weight_loader(getattr(layer, name), tensor, index)
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(3, 192, generator=torch.Generator().manual_seed(4))
    ref = F.linear(x, torch.cat([G.dequantize(refined.tensors), G.dequantize(single[1].tensors)]))
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)


def test_merge_rows_picks_super_scales_too():
    w, _, h = _layer(n=8, k=64, m=256, seed=5)
    a = G.encode_wint2_hessian(w, h, super_windows=16.0)
    b = G.encode_wint2_hessian(w, h, super_windows=32.0)
    merged = merge_rows(a, b)
    take_b = b.row_loss < a.row_loss
    assert 0 < int(take_b.sum()) < 8 or bool((merged.row_loss == torch.minimum(a.row_loss, b.row_loss)).all())
    torch.testing.assert_close(merged.row_loss.double(), _exact_loss(w, merged.tensors, h), rtol=2e-3, atol=1e-6)
    with pytest.raises(ValueError, match="needs at least one candidate"):
        encode_best_code_scale(lambda cs: a, ())


def test_split_calibration_ids_holds_out_the_tail(tmp_path, tiny_llama_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    texts = ["a b c d e f g h i j k l m n o p"] * 6
    calib, held = split_calibration_ids(tok, texts, CalibSpec("x", num_samples=100, seq_len=8, holdout_samples=2))
    stream = torch.cat([calib.reshape(-1), held.reshape(-1)])
    rows = calib.shape[0] + held.shape[0]
    assert held.shape == (2, 8) and calib.shape[0] >= 1
    few, held_few = split_calibration_ids(tok, texts, CalibSpec("x", num_samples=2, seq_len=8, holdout_samples=2))
    assert torch.equal(held_few, held) and torch.equal(few, calib[:2])      # held out: independent of S
    plain, none = split_calibration_ids(tok, texts, CalibSpec("x", num_samples=2, seq_len=8))
    assert torch.equal(plain, calib[:2]) and none.shape == (0, 8) and stream.numel() == rows * 8
    with pytest.raises(ValueError, match="none left for calibration"):
        split_calibration_ids(tok, texts, CalibSpec("x", num_samples=2, seq_len=8, holdout_samples=rows))
    with pytest.raises(ValueError, match="holdout_samples must be >= 0"):
        CalibSpec("x", holdout_samples=-1)


def test_encoder_options_validation():
    assert EncoderOptions().act_orders == ("none", "group") and EncoderOptions().code_scales == E.CODE_SCALE_CANDIDATES
    with pytest.raises(ValueError, match="act_orders"):
        EncoderOptions(act_orders=("sideways",))
    with pytest.raises(ValueError, match="code_scales"):
        EncoderOptions(code_scales=(100.001,))
    with pytest.raises(ValueError, match="not a calibrated method"):
        EncoderOptions(method="plain")


def test_writer_cli_act_order_and_code_scales(tiny_llama_dir, tmp_path, capsys):
    calib = word_text_file(tmp_path / "calib.jsonl")
    out = tmp_path / "cli"
    writer_main(["--model_path", str(tiny_llama_dir), "--save_directory", str(out), "--method", "gptq",
                 "--calib_file", str(calib), "--calib_num_samples", "4", "--calib_seq_len", "32",
                 "--calib_holdout_samples", "1", "--act_order", "none", "quad",
                 "--code_scales", *map(str, E.CODE_SCALE_CANDIDATES)])
    assert capsys.readouterr().out.strip().splitlines()[-2].startswith("mean relative error wint2:")
    from safetensors.torch import load_file
    tensors = load_file(str(out / "model.safetensors"))
    scales = torch.cat([t for name, t in tensors.items() if name.endswith("code_scale")])
    assert len(scales.unique()) > 1 and set(scales.unique().tolist()) <= set(E.CODE_SCALE_CANDIDATES)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quantization"] == "wint2"
    LLM(str(out), max_model_len=64)                                           # loads
    with pytest.raises(SystemExit):
        writer_main(["--model_path", str(tiny_llama_dir), "--save_directory", str(tmp_path / "x"),
                     "--method", "gptq", "--calib_file", str(calib), "--code_scales", "100.001"])
    assert "code_scales" in capsys.readouterr().err
