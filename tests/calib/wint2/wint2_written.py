"""Shared by the WINT2 tuning tests: a plain WINT2 checkpoint of the tiny Llama and its first WINT2 Linear."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ascend_llm.numerics import wint2 as L
from calib.wint2.writer import write_wint2_checkpoint


@pytest.fixture(scope="module")
def written(tiny_llama_dir, tmp_path_factory) -> Path:
    """A directory whose `plain/` holds the tiny Llama written by the plain WINT2 encoder."""
    root = tmp_path_factory.mktemp("wint2_written")
    write_wint2_checkpoint(tiny_llama_dir, root / "plain")
    return root


def first_wint2(root: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """(module name, {WINT2 tensor name: tensor}) of the first WINT2 Linear in root/plain."""
    tensors = load_file(str(root / "plain" / "model.safetensors"))
    name = next(n.removesuffix(".quant_weight") for n in tensors if n.endswith(".quant_weight"))
    return name, {t: tensors[f"{name}.{t}"] for t in L.TENSOR_NAMES}
