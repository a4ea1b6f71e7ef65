"""Fixtures shared by the backend-against-CPU tests (test_npu_backend.py, test_cuda_backend.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from tests.quant.w8a8_writer import ALL_PROJ, write_w8a8_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_llama_dir, tiny_qwen2_dir, tmp_path_factory) -> Callable[[str, str | None], Path]:
    """tiny_checkpoint(arch, layer_type) -> directory: the float tiny model ("llama" or "qwen2") when
    layer_type is None, else an msModelSlim checkpoint of it, written once, with every decoder
    Linear of that type ("W8A8", "W8A8_DYNAMIC", "W8A16")."""
    floats = {"llama": tiny_llama_dir, "qwen2": tiny_qwen2_dir}
    written: dict[tuple[str, str], Path] = {}

    def get(arch: str, layer_type: str | None) -> Path:
        if layer_type is None:
            return floats[arch]
        if (arch, layer_type) not in written:
            out = tmp_path_factory.mktemp(f"{arch}_{layer_type.lower()}")
            written[arch, layer_type] = write_w8a8_checkpoint(floats[arch], out, {p: layer_type for p in ALL_PROJ})
        return written[arch, layer_type]
    return get
