"""iter_safetensors_weights over single, sharded and loose checkpoints, and its error reporting."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ascend_llm.loader import iter_safetensors_weights


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(16, 8, generator=generator),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=generator),
        "model.layers.1.mlp.up_proj.weight": torch.randn(12, 8, generator=generator).to(torch.bfloat16),
        "model.norm.weight": torch.ones(8),
    }


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name


def _write_sharded(directory: Path, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    weight_map = {}
    for shard, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, str(directory / shard))
        weight_map.update({n: shard for n in shard_names})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return weight_map


def test_single_file(tmp_path: Path) -> None:
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    _assert_same(dict(iter_safetensors_weights(tmp_path)), tensors)


def test_sharded_with_index_round_trips(tmp_path: Path) -> None:
    tensors = _tensors()
    _write_sharded(tmp_path, tensors)
    pairs = list(iter_safetensors_weights(str(tmp_path)))
    assert len(pairs) == len(tensors), "each tensor exactly once"
    _assert_same(dict(pairs), tensors)


def test_loose_safetensors_files(tmp_path: Path) -> None:
    tensors = _tensors()
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[:1]}, str(tmp_path / "a.safetensors"))
    save_file({n: tensors[n] for n in names[1:]}, str(tmp_path / "b.safetensors"))
    _assert_same(dict(iter_safetensors_weights(tmp_path)), tensors)


def test_no_safetensors_fails_at_call_time(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="no \\*.safetensors") as info:
        iter_safetensors_weights(tmp_path)  # not even iterated
    assert str(tmp_path) in str(info.value)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        iter_safetensors_weights(tmp_path / "nope")


def test_garbage_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ValueError, match="model.safetensors.*corrupt"):
        list(iter_safetensors_weights(tmp_path))


def test_truncated_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file(_tensors(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="model.safetensors"):
        list(iter_safetensors_weights(tmp_path))


def test_corrupt_shard_is_named(tmp_path: Path) -> None:
    _write_sharded(tmp_path, _tensors())
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"{}")
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors"):
        list(iter_safetensors_weights(tmp_path))


def test_index_naming_missing_shard(tmp_path: Path) -> None:
    _write_sharded(tmp_path, _tensors())
    (tmp_path / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="model-00001-of-00002.safetensors.*does not exist"):
        iter_safetensors_weights(tmp_path)


def test_index_listing_absent_tensor(tmp_path: Path) -> None:
    weight_map = _write_sharded(tmp_path, _tensors())
    weight_map["model.ghost.weight"] = "model-00001-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match="model.ghost.weight"):
        list(iter_safetensors_weights(tmp_path))


def test_invalid_index_json(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ValueError, match="index.json"):
        iter_safetensors_weights(tmp_path)
