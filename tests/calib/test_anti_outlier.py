"""Anti-outlier smoothing (calib.anti_outlier): float equivalence, outlier reduction, quantized error.

Tiny random Llama / Qwen2 models get an artificial 50x activation outlier in one channel of every
smoothing group (producer channel scaled by 50, readers' columns by 1/50: the float model is
unchanged), then each method must keep the float logits, flatten the channels and, where it
searches or balances, lower the simulated W8A8 output error.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from calib.anti_outlier import COLUMNS, apply_anti_outlier
from calib.smoothing.fold import BiasedRMSNorm, find_groups, fold_group
from calib.smoothing.stats import collect_input_stats

METHODS = ["m1", "m2", "m3", "m4", "m6"]
OUTLIER = 50.0
VOCAB = 384          # tests/tiny_models.py VOCAB_SIZE
CALIB_TEXT = Path(__file__).resolve().parents[3] / "shared" / "data" / "calib_prose.jsonl"


def _ids(seed: int, seq: int = 32) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, seq), generator=torch.Generator().manual_seed(seed))


CALIB = [_ids(i) for i in range(4)]
HELD_OUT = _ids(100, 48)


@torch.no_grad()
def _inject_outliers(model: nn.Module) -> None:
    """Scale one producer channel per group by OUTLIER and the matching reader columns by 1/OUTLIER."""
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        c = 3 + i
        layer.input_layernorm.weight[c] *= OUTLIER
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
            lin.weight[:, c] /= OUTLIER
        layer.post_attention_layernorm.weight[c + 5] *= OUTLIER
        for lin in (mlp.gate_proj, mlp.up_proj):
            lin.weight[:, c + 5] /= OUTLIER
        kv_head, d = 1, 2 + i                                 # v channel -> the o columns of its query heads
        attn.v_proj.weight[kv_head * head_dim + d] *= OUTLIER
        if attn.v_proj.bias is not None:
            attn.v_proj.bias[kv_head * head_dim + d] *= OUTLIER
        for h in range(kv_head * groups, (kv_head + 1) * groups):
            attn.o_proj.weight[:, h * head_dim + d] /= OUTLIER
        mlp.up_proj.weight[11 + i] *= OUTLIER
        mlp.down_proj.weight[:, 11 + i] /= OUTLIER


def _load(model_dir, inject: bool = True) -> nn.Module:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if inject:
        _inject_outliers(model)
    return model


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: these are small ops, and OpenMP threads stall badly on a busy 2-core machine.
    It also makes the SmolLM2 timing a single-core CPU-time measurement, independent of machine load."""
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


@pytest.fixture(params=["llama", "qwen2"])
def model_dir(request, tiny_llama_dir, tiny_qwen2_dir):
    return tiny_llama_dir if request.param == "llama" else tiny_qwen2_dir


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor = HELD_OUT) -> torch.Tensor:
    return model(input_ids=ids).logits[0]                                   # [seq, vocab]


def _assert_same_float(out: torch.Tensor, ref: torch.Tensor) -> None:
    # Folding only reorders fp32 products (scales up to ~50x): allow 1e-4 relative to the largest logit
    # (measured: max |diff| / max |logit| <= 8e-7 on the tiny models, 3e-6 on SmolLM2).
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


# ---------------------------------------------------------------- independent W8A8 simulation

def _fq_act_static(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0
    zero_point = round(-lo / scale) - 128
    return (torch.clamp(torch.round(x / scale) + zero_point, -128, 127) - zero_point) * scale


def _fq_weight(w: torch.Tensor) -> torch.Tensor:
    scale = w.abs().amax(dim=1, keepdim=True) / 127.0                      # [n, 1]
    return torch.clamp(torch.round(w / scale), -127, 127) * scale


@torch.no_grad()
def _w8a8_logits_error(model: nn.Module) -> float:
    """Logits MSE of the model with every decoder Linear simulated in W8A8 static, vs its float logits."""
    ref = _logits(model)
    qmodel = copy.deepcopy(model)
    linears = {n: m for n, m in qmodel.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
    ranges: dict[str, list[float]] = {}

    def record(name):
        def hook(module, args):
            lo, hi = ranges.get(name, [float("inf"), float("-inf")])
            ranges[name] = [min(lo, float(args[0].min())), max(hi, float(args[0].max()))]
        return hook

    handles = [m.register_forward_pre_hook(record(n)) for n, m in linears.items()]
    for ids in CALIB:
        qmodel(input_ids=ids)
    for h in handles:
        h.remove()
    for name, module in linears.items():
        module.weight.copy_(_fq_weight(module.weight))
        lo, hi = ranges[name]
        module.register_forward_pre_hook(lambda m, args, lo=lo, hi=hi: (_fq_act_static(args[0], lo, hi),))
    return float((_logits(qmodel) - ref).pow(2).mean())


# ---------------------------------------------------------------- tests

def test_injected_outliers_keep_the_float_model(model_dir):
    _assert_same_float(_logits(_load(model_dir)), _logits(_load(model_dir, inject=False)))


@pytest.mark.parametrize("method", METHODS)
def test_float_unchanged_and_outliers_reduced(model_dir, method):
    model = _load(model_dir)
    ref = _logits(model)
    report = apply_anti_outlier(model, method, CALIB)
    _assert_same_float(_logits(model), ref)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())   # hooks removed
    assert len(report.entries) == 4 * len(model.model.layers)
    for entry in report.entries:
        assert entry.folded and entry.reason is None, entry.name
        assert entry.ratio_before > 10.0, entry.name                      # the injected outlier is visible
        assert entry.ratio_after < entry.ratio_before, (entry.name, entry.ratio_before, entry.ratio_after)
    # The reported "after" statistic matches an independent measurement of a reader's input.
    seen = []
    handle = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1]).abs().amax(dim=0)))
    with torch.no_grad():
        for ids in CALIB:
            model(input_ids=ids)
    handle.remove()
    absmax = torch.stack(seen).amax(dim=0)                                  # [intermediate]
    entry = next(e for e in report.entries if e.name == "model.layers.0.mlp.down_proj")
    assert entry.ratio_after == pytest.approx(float(absmax.max() / absmax.median()), rel=1e-4)
    assert entry.absmax_after == pytest.approx(float(absmax.max()), rel=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_quantized_error_lower(model_dir, method):
    model = _load(model_dir)
    error_before = _w8a8_logits_error(model)
    report = apply_anti_outlier(model, method, CALIB)
    error_after = _w8a8_logits_error(model)
    # measured logits MSE: llama 0.133 -> 0.0004 .. 0.005, qwen2 0.2 -> 0.0007 .. 0.0066 (m4 best, m3 worst)
    assert error_after < 0.1 * error_before, (error_before, error_after)
    for entry in report.entries:                                            # the per-group measure agrees
        assert entry.error_after < entry.error_before, entry.name


def test_dynamic_search_lowers_its_own_error(model_dir):
    model = _load(model_dir)
    report = apply_anti_outlier(model, "m6", CALIB, is_dynamic=True, grid=[0.25, 0.5, 0.75])
    assert report.options["is_dynamic"] is True
    assert all(e.error_after < e.error_before for e in report.entries)


def test_m2_adds_norm_and_linear_biases(model_dir):
    model = _load(model_dir)
    ref = _logits(model)
    had_bias = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.bias is not None}
    report = apply_anti_outlier(model, "m2", CALIB, alpha=0.5)
    _assert_same_float(_logits(model), ref)
    state = model.state_dict()
    for i, layer in enumerate(model.model.layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            module = getattr(layer, norm)
            assert isinstance(module, BiasedRMSNorm)
            assert f"model.layers.{i}.{norm}.bias" in state and f"model.layers.{i}.{norm}.weight" in state
            assert float(module.bias.detach().abs().max()) > 0.0
        for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                    layer.mlp.gate_proj, layer.mlp.up_proj):
            assert isinstance(lin.bias, nn.Parameter) and float(lin.bias.detach().abs().max()) > 0.0
        assert layer.self_attn.o_proj.bias is None and layer.mlp.down_proj.bias is None
    assert {e.name for e in report.entries if e.shift} == {e.name for e in report.entries if "qkv" in e.name or
                                                           "gate_up" in e.name}
    assert had_bias < {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.bias is not None}
    # The shifted norm outputs are centred on the calibration data: max + min ~ 0 per channel.
    lo, hi = [], []

    def record(module, args):
        lo.append(args[0][0].amin(0))
        hi.append(args[0][0].amax(0))

    handle = model.model.layers[1].self_attn.q_proj.register_forward_pre_hook(record)
    with torch.no_grad():
        for ids in CALIB:
            model(input_ids=ids)
    handle.remove()
    lo, hi = torch.stack(lo).amin(0), torch.stack(hi).amax(0)
    assert float(((hi + lo).abs() / (hi - lo)).max()) < 1e-4


def test_m4_iterates_and_stops(model_dir):
    model = _load(model_dir)
    ref = _logits(model)
    report = apply_anti_outlier(model, "m4", CALIB, step=0.1, iterations=3)
    _assert_same_float(_logits(model), ref)
    for entry in report.entries:
        assert 1 <= entry.iterations <= 3 and entry.alpha == entry.beta == 0.1
        assert entry.error_after < entry.error_before


@pytest.mark.parametrize("method", ["m3", "m6"])
def test_search_without_gain_folds_nothing(tiny_llama_dir, method):
    # grid [0.0]: m3's only candidate is s = 1 and m6's is alpha 0 / beta 1 (pure weight balancing). s = 1
    # cannot beat the unsmoothed layer, so m3 must fold nothing; the report says why.
    model = _load(tiny_llama_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = apply_anti_outlier(model, method, CALIB, grid=[0.0])
    kept = [e for e in report.entries if not e.folded]
    assert all(e.reason == "no smoothing lowered the quantization error" and e.error_after == e.error_before
               for e in kept)
    for entry in report.entries:
        assert entry.error_after <= entry.error_before
    if method == "m3":
        assert len(kept) == len(report.entries)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_gqa_o_proj_map_and_skip(tiny_llama_dir):
    model = _load(tiny_llama_dir, inject=False)
    o_group = next(g for g in find_groups(model) if g.name.endswith("o_proj"))
    # 4 query heads over 2 kv heads, head_dim 16: heads 0,1 read kv head 0; heads 2,3 read kv head 1.
    expected = torch.cat([torch.arange(16), torch.arange(16), torch.arange(16, 32), torch.arange(16, 32)])
    assert torch.equal(o_group.channel_map, expected)
    ref = _logits(model)
    model.config.num_key_value_heads = 3                                    # a layout the fold cannot follow
    report = apply_anti_outlier(model, "m1", CALIB)
    skipped = [e for e in report.entries if not e.folded]
    assert [e.name for e in skipped] == [f"model.layers.{i}.self_attn.o_proj" for i in range(2)]
    assert all("num_key_value_heads 3" in e.reason for e in skipped)
    assert all(r[-1].startswith("skipped: ") for r in report.to_rows() if r[0].endswith("o_proj"))
    _assert_same_float(_logits(model), ref)


def test_fold_group_random_scale_and_shift(tiny_qwen2_dir):
    model = _load(tiny_qwen2_dir, inject=False)
    ref = _logits(model)
    gen = torch.Generator().manual_seed(0)
    for group in find_groups(model):
        scale = torch.rand(group.num_channels, generator=gen) * 4 + 0.25     # [c] in [0.25, 4.25)
        shift = torch.randn(group.num_channels, generator=gen) if group.kind == "norm" else None
        fold_group(group, scale, shift)
    _assert_same_float(_logits(model), ref)
    with pytest.raises(ValueError, match="positive"):
        fold_group(find_groups(model)[0], -torch.ones(64))
    with pytest.raises(ValueError, match="shift can only be folded into a norm group"):
        fold_group(find_groups(model)[1], torch.ones(32), torch.zeros(32))
    with pytest.raises(ValueError, match=r"shift must be finite, of shape \(64,\); got \(63,\)"):
        fold_group(find_groups(model)[0], torch.ones(64), torch.zeros(63))
    _assert_same_float(_logits(model), ref)                                 # rejected folds changed nothing


def test_collect_input_stats_and_hook_cleanup(tiny_qwen2_dir):
    model = _load(tiny_qwen2_dir)
    name = "model.layers.1.mlp.down_proj"
    inputs = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, args: inputs.append(args[0][0]))
    with torch.no_grad():
        for ids in CALIB:
            model(input_ids=ids)
    handle.remove()
    x = torch.cat(inputs)                                                    # [4 * 32, intermediate]
    stats = collect_input_stats(model, [name], CALIB, num_rows=20)[name]
    assert torch.equal(stats.min, x.amin(0)) and torch.equal(stats.max, x.amax(0))
    assert stats.num_tokens == 128 and stats.samples.shape == (20, 96)     # ceil(20 / 4) = 5 rows per batch
    assert all(any(torch.equal(row, r) for r in x) for row in stats.samples)
    with pytest.raises(IndexError):                                          # token id past the vocabulary
        collect_input_stats(model, [name], [torch.tensor([[VOCAB + 5]])], num_rows=4)
    assert all(not m._forward_pre_hooks for m in model.modules())
    with pytest.raises(ValueError, match="no module named 'model.layers.9.mlp'"):
        collect_input_stats(model, ["model.layers.9.mlp"], CALIB, num_rows=4)


def test_report_rows_and_json(tiny_llama_dir):
    model = _load(tiny_llama_dir)
    report = apply_anti_outlier(model, "m6", CALIB, grid=[0.3, 0.6])
    rows = report.to_rows()
    assert len(rows) == 8 and all(len(r) == len(COLUMNS) for r in rows)
    assert rows[0][0] == "model.layers.0.self_attn.qkv_proj" and rows[0][-1] == "applied"
    data = json.loads(json.dumps(report.to_dict()))
    assert data["method"] == "m6" and data["options"]["grid"] == [0.3, 0.6]
    assert data["groups"][1]["producer"] == "model.layers.0.self_attn.v_proj"
    assert data["groups"][0]["alpha"] in (0.3, 0.6)


@pytest.mark.parametrize(("method", "options", "match"), [
    ("m5", {}, r"unknown anti-outlier method 'm5'; known methods: m1, m2, m3, m4, m6"),
    ("smoothquant", {}, "'smoothquant'"),
    ("m1", {"alfa": 0.5}, r"unknown option\(s\) 'alfa' for anti-outlier method m1"),
    ("m3", {"alpha": 0.5, "bogus": 1}, r"'alpha', 'bogus'"),
    ("m4", {"grid": [0.5]}, "'grid'"),
    ("m1", {"alpha": 1.5}, r"alpha=1.5: must be a number in \[0, 1\]"),
    ("m6", {"grid": []}, "grid=.*non-empty"),
    ("m4", {"iterations": 0}, "iterations=0"),
    ("m1", {"w_bit": 3}, "w_bit=3"),
    ("m1", {"a_bit": 4}, "a_bit=4"),
    ("m3", {"statistic": "median"}, "statistic='median': must be 'absmax' or 'mean'"),
    ("m1", {"group_size": -8}, "group_size=-8"),
])
def test_bad_method_or_option(tiny_llama_dir, method, options, match):
    model = _load(tiny_llama_dir, inject=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        apply_anti_outlier(model, method, CALIB, **options)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())   # untouched


@pytest.mark.parametrize("batches", [[], [torch.randn(1, 8)], [torch.zeros(8, dtype=torch.long)], "text"])
def test_bad_calib_batches(tiny_llama_dir, batches):
    with pytest.raises(ValueError, match="calib_batches"):
        apply_anti_outlier(_load(tiny_llama_dir, inject=False), "m1", batches)


def test_unsupported_model():
    with pytest.raises(ValueError, match="only Llama / Qwen2-style"):
        apply_anti_outlier(nn.Linear(4, 4), "m1", CALIB)


# ---------------------------------------------------------------- real model

@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoTokenizer

    from ascend_llm.loader.resolve import resolve_model_path
    if not CALIB_TEXT.exists():
        pytest.skip(f"{CALIB_TEXT} not available")
    path = resolve_model_path("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = [json.loads(line)["text"] for line in CALIB_TEXT.read_text().splitlines()[:4]]
    return path, [torch.tensor([tokenizer(t)["input_ids"][:128]]) for t in texts]


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_smollm2_logits_unchanged_and_fast(smollm2, method):
    path, calib = smollm2
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = calib[0][:, :64]
    ref = _logits(model, ids)
    start = time.process_time()                       # CPU seconds of this process, on one thread
    report = apply_anti_outlier(model, method, calib)
    cpu_seconds = time.process_time() - start
    _assert_same_float(_logits(model, ids), ref)
    assert cpu_seconds < 60.0, f"{method} took {cpu_seconds:.1f} CPU s"
    folded = [e for e in report.entries if e.folded]
    assert len(folded) >= len(report.entries) - 2
    assert sum(e.error_after for e in folded) < sum(e.error_before for e in folded)


def test_fake_quant_weight_groups_are_per_channel_quantization_of_each_group():
    from calib.smoothing.methods import fake_quant_weight

    w = torch.randn(6, 48, generator=torch.Generator().manual_seed(3))
    w[2, 5] = 40.0                                         # one outlier: only its group's scale grows
    grouped = fake_quant_weight(w, 4, 16)
    by_hand = torch.cat([fake_quant_weight(w[:, g:g + 16], 4) for g in range(0, 48, 16)], dim=1)
    assert torch.equal(grouped, by_hand)
    assert torch.equal(fake_quant_weight(w, 4, 48), fake_quant_weight(w, 4))
    assert (grouped - w).pow(2).sum() < (fake_quant_weight(w, 4) - w).pow(2).sum()


def test_weight_only_search_measures_the_group_quantizer(model_dir):
    """AWQ (the group-wise int4 weight-only case): the search's error is the output error of the
    group quantizer with float activations, and the mean-|x| statistic (AWQ's s = mean|x|^a)
    lowers every smoothed group's error."""
    from calib.smoothing.methods import QuantSpec, group_data, quant_error

    fresh = _load(model_dir)
    group = find_groups(fresh)[0]
    stats = collect_input_stats(fresh, [group.linear_names[0]], CALIB, 128, runner=fresh.model)
    data = group_data(group, stats[group.linear_names[0]])
    ones = torch.ones(group.num_channels)
    by_hand = {g: quant_error(data, ones, None, QuantSpec(4, 16, False, g)) for g in (0, 16)}
    assert by_hand[0] != by_hand[16]
    for g in (0, 16):
        report = apply_anti_outlier(_load(model_dir), "m3", CALIB, w_bit=4, a_bit=16, group_size=g)
        assert report.entries[0].error_before == pytest.approx(by_hand[g], rel=1e-5)
    mean = apply_anti_outlier(_load(model_dir), "m3", CALIB, w_bit=4, a_bit=16, group_size=16, statistic="mean")
    assert mean.options["group_size"] == 16 and mean.options["statistic"] == "mean"
    assert all(e.error_after <= e.error_before for e in mean.entries)
    assert any(e.folded and e.error_after < 0.9 * e.error_before for e in mean.entries)
