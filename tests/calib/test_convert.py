"""`python -m calib.convert` on checkpoints the peer tools wrote (tests/fixtures/peer_checkpoints/):
llm-compressor's compressed-tensors -> ascendV1 and msModelSlim's ascendV1 -> compressed-tensors.

Each converted checkpoint is loaded by this runtime and its logits compared with the source's
(same runtime, same prompts: the fixtures' reference input_ids). Bounds, max |difference| over the
[2, 8, 128] fp32 logits:
- lossless pairs (same codes, same scales; a W8A8 weight_scale re-derived as deq_scale / input_scale
  multiplies back to deq_scale within one float32 ulp): measured <= 2e-6, bound 1e-4;
- a static W8A8 float bias folded into quant_bias (Qwen2's q/k/v biases): rounds each bias to a
  multiple of deq_scale (the report gives the change, measured <= 3.3e-5); the q/k/v outputs move
  by that much, which can flip a later static activation rounding by one int8 step (0.027 here):
  measured max 0.012, bound 0.05;
- per-tensor static FP8 -> W8A8FP8_DYNAMIC: activations switch from the static per-tensor scale to
  dynamic per-token ones (vllm-ascend has no static FP8): compared with transformers' reference
  logits of the source, within the bound the runtime meets on the source itself (0.3 / 0.05).
The ascendV1 outputs also pass every lookup vllm-ascend performs (the conformance walk of
tests/calib/test_vllm_ascend_conformance.py).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ascend_llm.quant.weight_only_group import unpack_int32
from calib.convert.cli import convert, main
from calib.convert.write_compressed_tensors import pack_codes
from tests.calib.test_vllm_ascend_conformance import vllm_ascend_problems
from tests.quant.peer_fixtures import batch_logits, build_dir

PEERS = Path(__file__).resolve().parents[1] / "fixtures" / "peer_checkpoints"
LLMC, MSMS = PEERS / "llmcompressor", PEERS / "msmodelslim"
LOSSLESS = 1e-4
CT_TO_ASCEND = {   # llm-compressor case -> (written ascendV1 type of q_proj, bound)
    "llama_w8a8_int8_static": ("W8A8", LOSSLESS),
    "qwen2_w8a8_int8_static_asym": ("W8A8", 0.05),
    "llama_w8a8_int8_dynamic": ("W8A8_DYNAMIC", LOSSLESS),
    "qwen2_w8a8_int8_dynamic": ("W8A8_DYNAMIC", LOSSLESS),
    "llama_fp8_dynamic": ("W8A8FP8_DYNAMIC", LOSSLESS),
}
ASCEND_TO_CT = ("llama_w8a8", "qwen2_w8a8", "llama_w8a8_dynamic", "qwen2_w8a8_dynamic",
                "llama_w8a16", "llama_w8a8_disabled", "llama_w8a8_safetensor", "qwen2_v1_w8a8",
                "llama_w8a16_g32", "llama_w4a16_g32", "llama_w4a16_g32_asym", "llama_w4a16")
# Weight-only int4 / group-wise int8 (pack-quantized from llm-compressor) -> msModelSlim's W4A16 /
# per-group W8A16 layout: the same codes, scales and zero points, so lossless here; upstream
# vllm-ascend has no W4A16 linear scheme and a per-channel-only W8A16, which the conformance walk
# reports (and the converter's report names): case -> (written type, what every problem the walk
# finds says: an unknown type, or a per-group scale where vllm-ascend creates [n, 1])
CT_WEIGHT_ONLY_TO_ASCEND = {
    "llama_w4a16_g32": ("W4A16", "'W4A16'"),
    "llama_w4a16_g32_asym": ("W4A16", "'W4A16'"),
    "qwen2_w4a16_g32": ("W4A16", "'W4A16'"),
    "llama_w4a16_g32_actorder_weight": ("W4A16", "'W4A16'"),
    "llama_w8a16_g32": ("W8A16", ", 1)"),
}


def _prompts() -> torch.Tensor:
    return load_file(str(LLMC / "llama_w8a8_int8_static" / "reference.safetensors"))["input_ids"]


def _logits(model_dir: Path) -> torch.Tensor:
    config, model = build_dir(model_dir)
    return batch_logits(model, config, _prompts())


def _max_diff(a: Path, b: Path) -> float:
    return float((_logits(a) - _logits(b)).abs().max())


@pytest.mark.parametrize("case", sorted(CT_TO_ASCEND))
def test_compressed_tensors_to_ascendv1(case, tmp_path):
    quant_type, bound = CT_TO_ASCEND[case]
    out = tmp_path / "out"
    report = convert("compressed-tensors", "ascendv1", LLMC / case, out)
    description = json.loads((out / "quant_model_description.json").read_text())
    assert description["model.layers.0.self_attn.q_proj.weight"] == quant_type
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert vllm_ascend_problems(out, torch.float32) == []
    assert _max_diff(LLMC / case, out) < bound
    assert report.summary["lossless"] == (bound == LOSSLESS)


@pytest.mark.parametrize("case", sorted(CT_WEIGHT_ONLY_TO_ASCEND))
def test_weight_only_groups_convert_to_modelslims_layout(case, tmp_path):
    quant_type, walk_problem = CT_WEIGHT_ONLY_TO_ASCEND[case]
    out = tmp_path / "out"
    report = convert("compressed-tensors", "ascendv1", LLMC / case, out)
    description = json.loads((out / "quant_model_description.json").read_text())
    assert description["model.layers.0.mlp.down_proj.weight"] == quant_type
    assert description["group_size"] == 32 and description["model_quant_type"] == quant_type
    assert report.summary["lossless"]
    assert report.summary["not_loaded_by_vllm_ascend"][0].startswith(quant_type)
    problems = vllm_ascend_problems(out, torch.float32)
    assert problems and all(walk_problem in p for p in problems), problems
    assert _max_diff(LLMC / case, out) < LOSSLESS


def test_weight_only_round_trip_keeps_every_byte(tmp_path):
    """msModelSlim W4A16 per-group with offsets -> compressed-tensors -> ascendV1: the tool's own
    tensors come back bit for bit (int4 pairs along n, float32 scales and offsets)."""
    src = MSMS / "llama_w4a16_g32_asym"
    convert("ascendv1", "compressed-tensors", src, tmp_path / "ct")
    quant = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    weights_args = quant["config_groups"]["group_0"]["weights"]
    assert (weights_args["strategy"], weights_args["group_size"], weights_args["symmetric"]) == ("group", 32, False)
    convert("compressed-tensors", "ascendv1", tmp_path / "ct", tmp_path / "back")
    source = load_file(str(next(src.glob("quant_model_weight*.safetensors"))))
    back = load_file(str(tmp_path / "back" / "quant_model_weights.safetensors"))
    for name, tensor in source.items():
        assert torch.equal(back[name], tensor), name


def test_static_bias_folding_is_reported(tmp_path):
    report = convert("compressed-tensors", "ascendv1", LLMC / "qwen2_w8a8_int8_static_asym", tmp_path / "o")
    notes = {m: e.get("note", "") for m, e in report.summary["layers"].items()}
    assert "quant_bias" in notes["model.layers.0.self_attn.q_proj"]         # Qwen2 q/k/v have biases
    assert notes["model.layers.0.self_attn.o_proj"] == ""                   # no bias: lossless
    saved = json.loads((tmp_path / "o" / "convert_report.json").read_text())
    assert saved["tool"] == "calib.convert" and not saved["lossless"]


def test_static_fp8_becomes_dynamic_and_stays_within_the_format(tmp_path):
    out = tmp_path / "out"
    report = convert("compressed-tensors", "ascendv1", LLMC / "llama_fp8", out)
    assert "dynamic per-token" in report.summary["layers"]["model.layers.0.mlp.down_proj"]["note"]
    ref = load_file(str(LLMC / "llama_fp8" / "reference.safetensors"))
    err = (_logits(out) - ref["logits"]).abs()
    assert float(err.max()) < 0.3 and float(err.mean()) < 0.05, (err.max(), err.mean())
    weights = load_file(str(out / "quant_model_weights.safetensors"))
    source = load_file(str(LLMC / "llama_fp8" / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj"
    assert torch.equal(weights[f"{name}.weight"].view(torch.uint8), source[f"{name}.weight"].view(torch.uint8))


@pytest.mark.parametrize("case", ASCEND_TO_CT)
def test_ascendv1_to_compressed_tensors(case, tmp_path):
    out = tmp_path / "out"
    report = convert("ascendv1", "compressed-tensors", MSMS / case, out)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert not list(out.glob("quant_model_description*.json"))
    assert report.summary["lossless"]
    assert _max_diff(MSMS / case, out) < LOSSLESS


def test_disabled_layers_stay_float_through_ignore(tmp_path):
    convert("ascendv1", "compressed-tensors", MSMS / "llama_w8a8_disabled", tmp_path / "o")
    quant = json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]
    description = json.loads((MSMS / "llama_w8a8_disabled" / "quant_model_description.json").read_text())
    floats = {k[:-len(".weight")] for k, v in description.items()
              if v == "FLOAT" and "_proj.weight" in k}
    assert floats and set(quant["ignore"]) == floats | {"lm_head"}


def test_round_trip_keeps_every_code_and_scale(tmp_path):
    convert("ascendv1", "compressed-tensors", MSMS / "qwen2_w8a8_dynamic", tmp_path / "ct")
    convert("compressed-tensors", "ascendv1", tmp_path / "ct", tmp_path / "back")
    source = load_file(str(next((MSMS / "qwen2_w8a8_dynamic").glob("quant_model_weight*.safetensors"))))
    back = load_file(str(tmp_path / "back" / "quant_model_weights.safetensors"))
    for name, tensor in source.items():
        assert torch.equal(back[name], tensor), name


@pytest.mark.parametrize("bits, words", [(8, 4), (4, 2)])
def test_pack_codes_is_what_the_loader_unpacks(bits, words):
    qmax = 2 ** (bits - 1)
    codes = torch.randint(-qmax, qmax, (6, 13), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    packed = pack_codes(codes, bits)
    assert packed.shape == (6, words) and packed.dtype == torch.int32
    assert torch.equal(unpack_int32(packed, bits, 13), codes)


@pytest.mark.parametrize("source, src, match", [
    ("ascendv1", MSMS / "llama_w8a8_c8", "C8 int8 KV-cache scales have no compressed-tensors"),
    ("ascendv1", MSMS / "llama_w8a8_m2", "anti-outlier norm bias"),
    ("compressed-tensors", LLMC / "llama_fp8_block", "block-wise FP8"),
    ("fastdeploy", PEERS / "fastdeploy" / "llama_block_wise_fp8", "'block_wise_fp8' is not converted"),
    ("fastdeploy", MSMS / "llama_w8a8", "no quantization_config (not a FastDeploy"),
    ("autofp8", LLMC / "llama_fp8", "quant_method 'fp8'"),
    ("compressed-tensors", LLMC / "llama_fp8_dynamic_kv_fp8", "kv_cache_scheme"),
    ("compressed-tensors", MSMS / "llama_w8a8", "no compressed-tensors quantization_config"),
    ("ascendv1", LLMC / "llama_w8a8_int8_static", "not an msModelSlim checkpoint"),
])
def test_unconvertible_input_exits_2_with_one_line(source, src, match, tmp_path, capsys):
    target = "ascendv1" if source == "compressed-tensors" else "compressed-tensors"
    assert main(["--from", source, "--to", target, str(src), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err
    assert not (tmp_path / "o").exists()                 # nothing half-written


def test_output_conventions(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    args = ["--from", "ascendv1", "--to", "compressed-tensors", str(MSMS / "llama_w8a16"), str(out)]
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "user data"
    assert main(args + ["--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "convert_report.json").is_file()
    assert not (out / "MANIFEST.json").exists()            # the source's provenance is not copied
    same = ["--from", "ascendv1", "--to", "ascendv1", str(MSMS / "llama_w8a16"), str(tmp_path / "x")]
    assert main(same) == 2 and "nothing to convert" in capsys.readouterr().err


def test_ascend_llm_convert_runs_the_converter(tmp_path):
    """`ascend-llm convert` (the runtime's CLI) runs the offline tool in a child process."""
    out = tmp_path / "o"
    done = subprocess.run([sys.executable, "-m", "ascend_llm.cli", "convert", "--from", "ascendv1",
                           "--to", "compressed-tensors", str(MSMS / "llama_w8a16"), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "convert_report.json").read_text())["lossless"]
    bad = subprocess.run([sys.executable, "-m", "ascend_llm.cli", "convert", "--from", "ascendv1",
                          "--to", "compressed-tensors", str(tmp_path / "missing"), str(tmp_path / "o2")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "is not a directory" in bad.stderr and "Traceback" not in bad.stderr


# converted from msModelSlim / FastDeploy layouts -> compressed-tensors, then loaded by transformers
# + compressed-tensors (scripts/make_converted_fixtures.sh; logits in
# tests/fixtures/peer_checkpoints/converted/): the format's own reader sees the same model as this
# runtime. Bounds as in tests/quant/test_peer_compressed_tensors.py: static int8 and weight-only
# (8- and 4-bit, channel or group 32, with or without zero points) exact (1e-4; measured <= 9.5e-7); dynamic int8 differs by
# compressed-tensors' per-token amax / 127.5 grid against ours / 127 (0.1 / 0.02; measured 0.05 / 0.0095).
READ_BY_TRANSFORMERS = {"llama_w8a8": (LOSSLESS, LOSSLESS), "qwen2_w8a8": (LOSSLESS, LOSSLESS),
                        "llama_w8a8_disabled": (LOSSLESS, LOSSLESS), "llama_w8a16": (LOSSLESS, LOSSLESS),
                        "llama_w8a8_dynamic": (0.1, 0.02), "qwen2_w8a8_dynamic": (0.1, 0.02),
                        "qwen2_v1_w8a8": (0.1, 0.02), "llama_wint8": (LOSSLESS, LOSSLESS),
                        "llama_wint4": (LOSSLESS, LOSSLESS), "llama_w8a16_g32": (LOSSLESS, LOSSLESS),
                        "llama_w4a16_g32": (LOSSLESS, LOSSLESS), "llama_w4a16": (LOSSLESS, LOSSLESS),
                        "llama_w4a16_g32_asym": (LOSSLESS, LOSSLESS)}
SOURCE_FORMATS = {"msmodelslim": "ascendv1", "fastdeploy": "fastdeploy"}


@pytest.mark.parametrize("case", sorted(READ_BY_TRANSFORMERS))
def test_transformers_reads_the_converted_checkpoint_as_we_do(case, tmp_path):
    fixture = PEERS / "converted" / case
    manifest = json.loads((fixture / "MANIFEST.json").read_text())
    assert manifest["compressed_tensors_version"] and manifest["source"].endswith(case)
    source = PEERS / manifest["source"].removeprefix("tests/fixtures/peer_checkpoints/")
    convert(SOURCE_FORMATS[source.parent.name], "compressed-tensors", source, tmp_path / "out")
    want = load_file(str(fixture / "transformers_logits.safetensors"))
    config, model = build_dir(tmp_path / "out")
    got = batch_logits(model, config, want["input_ids"])
    err = (got - want["logits"]).abs()
    max_bound, mean_bound = READ_BY_TRANSFORMERS[case]
    assert float(err.max()) < max_bound and float(err.mean()) < mean_bound, (err.max(), err.mean())
    reference = load_file(str(source / "reference" / "logits.safetensors"))
    assert torch.equal(reference["input_ids"], want["input_ids"])
    assert float((want["logits"] - reference["float_logits"]).abs().max()) > 1e-3    # it is quantized


# FastDeploy wint8 / wint4 in Paddle's CUTLASS layout (tests/fixtures/peer_checkpoints/fastdeploy/,
# written by scripts/make_fastdeploy_fixtures.py from FastDeploy's and Paddle's code): read back to
# row-major codes, the same codes and scales are written, so the logits are the source's (1e-4).
@pytest.mark.parametrize("case, target, written", [
    ("llama_wint8", "ascendv1", "W8A16"), ("llama_wint8", "compressed-tensors", "pack-quantized"),
    ("llama_wint4", "compressed-tensors", "pack-quantized"), ("llama_wint4", "ascendv1", "W4A16")])
def test_fastdeploy_weight_only_converts_losslessly(case, target, written, tmp_path):
    src = PEERS / "fastdeploy" / case
    report = convert("fastdeploy", target, src, tmp_path / "out")
    assert report.summary["lossless"]
    assert report.summary["layers"]["model.layers.0.mlp.down_proj"]["written"] == written
    assert _max_diff(src, tmp_path / "out") < LOSSLESS


def test_mixed_group_and_activation_schemes_have_no_ascendv1_form(tmp_path, capsys):
    """One description group_size applies to every layer (msModelSlim), so a group-wise W4A16
    layer cannot sit beside a W8A8_DYNAMIC one in an ascendV1 checkpoint: refused, naming it."""
    src = tmp_path / "mixed"
    convert("ascendv1", "compressed-tensors", MSMS / "llama_w4a16_g32", src)
    donor = tmp_path / "dyn"
    convert("ascendv1", "compressed-tensors", MSMS / "llama_w8a8_dynamic", donor)
    weights = load_file(str(src / "model.safetensors"))
    dynamic = load_file(str(donor / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj"
    for leaf in ("weight_packed", "weight_scale", "weight_shape"):
        weights.pop(f"{name}.{leaf}")
    weights[f"{name}.weight"], weights[f"{name}.weight_scale"] = dynamic[f"{name}.weight"], dynamic[f"{name}.weight_scale"]
    from safetensors.torch import save_file
    save_file(weights, str(src / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    groups = config["quantization_config"]["config_groups"]
    groups["group_0"]["targets"] = [t for t in groups["group_0"].get("targets", [])] or ["Linear"]
    dyn_group = json.loads((donor / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    groups["group_1"] = dict(dyn_group, targets=[name])
    groups["group_0"]["targets"] = ["re:.*(q|k|v|o|gate|up)_proj$", "re:model.layers.0.mlp.down_proj$"]
    config["quantization_config"]["ignore"] = ["lm_head"]
    (src / "config.json").write_text(json.dumps(config))
    args = ["--from", "compressed-tensors", "--to", "ascendv1", str(src), str(tmp_path / "o")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "cannot share an ascendV1 checkpoint with group-wise weight-only layers" in err, err


@pytest.mark.parametrize("static", [True, False])
def test_autofp8_converts_to_both_formats(static, tiny_llama_dir, tmp_path):
    """AutoFP8 (this project's writer of that layout: e4m3 per-tensor weights, static input_scale
    or dynamic activations). To compressed-tensors static stays static and tensor-wise (lossless:
    the same logits to 1e-4); to ascendV1, and dynamic anywhere, activations become dynamic per
    token (noted; within the fp8 bound of the source's own gap to float, 0.3 / 0.05)."""
    from tests.quant.prequant_writers import write_autofp8
    src = write_autofp8(tiny_llama_dir, tmp_path / "fp8", static=static,
                        ignored_layers=["model.layers.0.mlp.down_proj"])
    ct = convert("autofp8", "compressed-tensors", src, tmp_path / "ct")
    ascend = convert("autofp8", "ascendv1", src, tmp_path / "ascend")
    quant = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.mlp.down_proj" in quant["ignore"]
    assert ct.summary["lossless"] == static and not ascend.summary["lossless"]
    ids = torch.tensor([[5, 9, 17, 33, 65, 100, 7, 3]])
    want = batch_logits(*reversed(build_dir(src)), ids)
    for out, bound in ((tmp_path / "ct", LOSSLESS if static else 0.3), (tmp_path / "ascend", 0.3)):
        err = (batch_logits(*reversed(build_dir(out)), ids) - want).abs()
        assert float(err.max()) < bound and float(err.mean()) < 0.05, (out.name, err.max(), err.mean())
