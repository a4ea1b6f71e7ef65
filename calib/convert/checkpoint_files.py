"""Reading a checkpoint directory: config.json and every tensor."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ascend_llm.loader import iter_safetensors_weights
from calib.config import CalibError


def read_config(src: Path) -> dict:
    """config.json as a dict; CalibError when missing or malformed."""
    path = src / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CalibError(f"{src}: no config.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CalibError(f"{path}: unreadable: {exc}") from None
    if not isinstance(config, dict):
        raise CalibError(f"{path}: must hold a JSON object")
    return config


def read_tensors(src: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's safetensors files, by name (in memory, on CPU)."""
    try:
        return dict(iter_safetensors_weights(src))
    except ValueError as exc:
        raise CalibError(str(exc)) from None


def linear_modules(tensors: dict[str, torch.Tensor], leaves: tuple[str, ...]) -> list[str]:
    """Module names that own a tensor named `<module>.<leaf>` for one of `leaves`, in name order."""
    found = {name.rpartition(".")[0] for name in tensors if name.rpartition(".")[2] in leaves}
    return sorted(found)


def take(tensors: dict[str, torch.Tensor], name: str, what: str) -> torch.Tensor:
    """Pop tensor `name`; CalibError naming it and what needed it when absent."""
    if name not in tensors:
        raise CalibError(f"{name}: missing ({what} needs it)")
    return tensors.pop(name)


def per_channel(scale: torch.Tensor, n: int, name: str) -> torch.Tensor:
    """A [n], [n, 1] or per-tensor [1] / [] scale -> float32 [n]."""
    flat = scale.detach().reshape(-1).to(torch.float32)
    if flat.numel() == 1:
        return flat.expand(n).clone()
    if flat.numel() != n:
        raise CalibError(f"{name}: {tuple(scale.shape)} is neither per-tensor nor per-channel for "
                         f"{n} output channels")
    return flat.clone()


def check_finite_positive(scale: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
        raise CalibError(f"{name}: scales must be finite and > 0")
