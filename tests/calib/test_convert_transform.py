"""`python -m calib.convert` on rotated checkpoints: our ascendV1 `online_hadamard` <-> compressed-tensors'
`transform_config` (llm-compressor's SpinQuant R4 form; calib/convert/transform_config.py).

A tiny Llama with every down_proj rotated (block 32, static W8A8; tests/quant/hadamard_writer.py)
is converted to compressed-tensors and back: both load in this runtime with the online Hadamard on
the same layers and give the source's logits exactly (same codes, scales and rotation; bound 1e-5,
measured 0). Dropping the transform_config changes the logits by > 0.5 (so the loader does apply
it). llm-compressor's own SpinQuant R4 checkpoint (tests/fixtures/ct_transform/) converts to
ascendV1 with its logits unchanged. What has no ascendV1 form is refused in one line naming it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from calib.convert.cli import convert, main
from calib.convert.transform_config import VLLM_NOTE
from tests.quant.hadamard_writer import write_rotated_checkpoint
from tests.quant.peer_fixtures import batch_logits, build_dir

SPINQUANT = Path(__file__).resolve().parents[1] / "fixtures" / "ct_transform" / "llmcompressor_spinquant_r4"
IDS = torch.randint(3, 300, (2, 8), generator=torch.Generator().manual_seed(3))
DOWNS = [f"model.layers.{i}.mlp.down_proj" for i in range(2)]


def _logits(model_dir: Path, ids: torch.Tensor = IDS) -> torch.Tensor:
    config, model = build_dir(model_dir)
    return batch_logits(model, config, ids)


@pytest.fixture(scope="module")
def converted(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("rotated_convert")
    src = write_rotated_checkpoint(tiny_llama_dir, root / "ascend", 32)
    convert("ascendv1", "compressed-tensors", src, root / "ct")
    convert("compressed-tensors", "ascendv1", root / "ct", root / "back")
    return {name: root / name for name in ("ascend", "ct", "back")}


def test_rotation_survives_both_directions_exactly(converted):
    want = _logits(converted["ascend"])
    assert float((_logits(converted["ct"]) - want).abs().max()) < 1e-5
    assert float((_logits(converted["back"]) - want).abs().max()) < 1e-5
    back = json.loads((converted["back"] / "quant_model_description.json").read_text())
    assert back["online_hadamard"] == {"block_size": 32, "layers": DOWNS}
    report = json.loads((converted["ct"] / "convert_report.json").read_text())
    assert report["online_hadamard"] == {"block_size": 32, "layers": DOWNS, "vllm": VLLM_NOTE}


def test_the_transform_config_is_spinquant_r4_and_the_matrix_is_saved_once(converted):
    quant = json.loads((converted["ct"] / "config.json").read_text())["quantization_config"]
    r4 = quant["transform_config"]["config_groups"]["R4"]
    assert (r4["type"], r4["head_dim"], r4["randomize"], r4["requires_grad"]) == ("hadamard", 32, False, False)
    assert r4["apply"] == [{"targets": DOWNS, "location": "input", "inverse": False, "ignore": []},
                           {"targets": DOWNS, "location": "weight_input", "inverse": True, "ignore": []}]
    tensors = load_file(str(converted["ct"] / "model.safetensors"))
    matrices = [n for n in tensors if "R4_input" in n]
    assert matrices == [f"{DOWNS[0]}.R4_input.weight"]
    assert set(tensors[matrices[0]].unique().tolist()) == {-1.0, 1.0}


def test_without_its_transform_config_the_checkpoint_computes_something_else(converted, tmp_path):
    dst = tmp_path / "dropped"
    shutil.copytree(converted["ct"], dst)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"]["transform_config"] = {}
    (dst / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(dst / "model.safetensors"))
    save_file({n: t for n, t in tensors.items() if "R4_input" not in n}, str(dst / "model.safetensors"))
    assert float((_logits(dst) - _logits(converted["ct"])).abs().max()) > 0.5


def test_llm_compressors_spinquant_r4_converts_to_ascendv1(tmp_path):
    convert("compressed-tensors", "ascendv1", SPINQUANT, tmp_path / "out")
    description = json.loads((tmp_path / "out" / "quant_model_description.json").read_text())
    assert description["online_hadamard"] == {"block_size": 32, "layers": DOWNS}
    assert not any("R4_input" in name for name in description)
    ids = load_file(str(SPINQUANT / "reference.safetensors"))["input_ids"]
    assert float((_logits(tmp_path / "out", ids) - _logits(SPINQUANT, ids)).abs().max()) < 1e-4


def _edited_spinquant(tmp_path: Path, edit) -> Path:
    src = tmp_path / "src"
    shutil.copytree(SPINQUANT, src)
    config = json.loads((src / "config.json").read_text())
    edit(config["quantization_config"]["transform_config"]["config_groups"])
    (src / "config.json").write_text(json.dumps(config))
    return src


@pytest.mark.parametrize("edit, match", [
    (lambda groups: groups["R4"].update(type="random-hadamard"), "R4: transform type 'random-hadamard' is not supported"),
    (lambda groups: groups["R4"]["apply"].append({"targets": ["re:.*v_proj$"], "location": "output"}),
     "online 'output' transforms (scheme 'R4') are not supported"),
    (lambda groups: groups.update(R4b=dict(groups["R4"], head_dim=16, apply=[
        {"targets": ["re:.*o_proj$"], "location": "input"}])),
     "online Hadamard block sizes (head_dim) [16, 32]; ascendV1's online_hadamard holds one block_size"),
], ids=["random-hadamard", "output-location", "two-block-sizes"])
def test_unconvertible_transforms_exit_2_in_one_line(edit, match, tmp_path, capsys):
    src = _edited_spinquant(tmp_path, edit)
    assert main(["--from", "compressed-tensors", "--to", "ascendv1", str(src), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err
    assert not (tmp_path / "o").exists()
