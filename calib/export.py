"""Write the msModelSlim ascendV1 layout: quant_model_description.json, quant_model_weights
(.safetensors, or -0000i-of-0000N shards + index), config/tokenizer files without
`quantization_config`. Layout and dtypes: the per-Linear tensors that
`ascend_llm/quant/w8a8.py` loads (msModelSlim's ascendV1 saver).

deq_scale dtype: float32 for a bfloat16 source model, int64 (float32 bits in the low 32 bits)
otherwise. msModelSlim's rule is "int64 unless the model dtype is bf16", so float16 and float32
sources both get int64; the runtime converts by value if it serves the checkpoint in another
dtype.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file
from tqdm import tqdm

from calib.quantize import kv_cache_tensors, layer_tensors

DESCRIPTION_FILE = "quant_model_description.json"
WEIGHTS_STEM = "quant_model_weights"
# v1 priority: the model_quant_type is the highest type present (WFP8AFP8_DYNAMIC placed with
# the dynamic types: MoFQ output mixes it with W8A8_DYNAMIC, which then names the model)
TYPE_PRIORITY = ("FLOAT", "W16A16S", "W8A16", "WFP8AFP8_DYNAMIC", "W8A8_DYNAMIC", "W8A8_MIX", "W8A8")
_COPIED_SUFFIXES = (".json", ".txt", ".jinja", ".model", ".py", ".tiktoken")
_NOT_COPIED = (DESCRIPTION_FILE,)


@dataclass
class LinearPlan:
    """How one decoder Linear is written: its type and (W8A8 static) activation range."""

    quant_type: str
    x_range: tuple[float, float] | None = None


def deq_scale_is_int64(source_dtype: torch.dtype) -> bool:
    """msModelSlim: int64 deq_scale unless the model dtype is bfloat16."""
    return source_dtype != torch.bfloat16


def build_checkpoint(model: nn.Module, plans: Mapping[str, LinearPlan],
                     kv_ranges: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None,
                     source_dtype: torch.dtype, progress: bool = True
                     ) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """(tensors, description) of the (smoothed) HF `model` quantized as `plans` says.

    `kv_ranges` maps "model.layers.i.self_attn.k_proj" / "...v_proj" to per-channel (min, max)
    of the cache contents; given, C8 scales are written. Float tensors keep `source_dtype`.
    """
    deq_as_int64 = deq_scale_is_int64(source_dtype)
    state = _float_state(model)
    tensors: dict[str, torch.Tensor] = {}
    types: dict[str, str] = {}
    for name, tensor in tqdm(state.items(), desc="export", disable=not progress):
        module, _, suffix = name.rpartition(".")
        plan = plans.get(module)
        if plan is not None and suffix == "weight":
            bias = state.get(f"{module}.bias")
            parts = layer_tensors(plan.quant_type, tensor, bias, plan.x_range, deq_as_int64)
            for part, value in parts.items():
                if value.is_floating_point() and plan.quant_type == "FLOAT":
                    value = value.to(source_dtype)
                tensors[f"{module}.{part}"], types[f"{module}.{part}"] = value.contiguous(), plan.quant_type
        else:   # embeddings, norms (+ anti-outlier norm bias), lm_head, Linear biases
            tensors[name], types[name] = tensor.detach().to(source_dtype).contiguous(), "FLOAT"
    description = _description(types, plans)
    if kv_ranges:
        for module, (c_min, c_max) in kv_ranges.items():
            for part, value in kv_cache_tensors(c_min, c_max).items():
                tensors[f"{module}.{part}"], description[f"{module}.{part}"] = value.contiguous(), "C8"
        description["kv_cache_type"] = "C8"
    return tensors, description


def _float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters by HF name, plus any `bias` tensor an anti-outlier method attached
    as a plain attribute; a tied lm_head is left out (the runtime ties it to the embedding)."""
    state = {name: p.detach().cpu().float() for name, p in model.named_parameters()}
    for name, module in model.named_modules():
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor) and f"{name}.bias" not in state:
            state[f"{name}.bias"] = bias.detach().cpu().float()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def _description(types: Mapping[str, str], plans: Mapping[str, LinearPlan]) -> dict[str, object]:
    present = {plan.quant_type for plan in plans.values()} | {"FLOAT"}
    model_type = max(present, key=TYPE_PRIORITY.index)
    description: dict[str, object] = {"model_quant_type": model_type, "version": "1.0.0", "group_size": 0}
    description.update(sorted(types.items()))
    return description


def write_checkpoint(out_dir: str | Path, tensors: Mapping[str, torch.Tensor],
                     description: Mapping[str, object], part_file_size_gb: float = 0.0) -> list[Path]:
    """Write the weights (sharded with an index when they exceed `part_file_size_gb` > 0) and the
    description; returns the weight files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(f"{WEIGHTS_STEM}*"):
        stale.unlink()
    shards = _split(tensors, int(part_file_size_gb * 1024 ** 3))
    if len(shards) == 1:
        paths = [out_dir / f"{WEIGHTS_STEM}.safetensors"]
    else:
        paths = [out_dir / f"{WEIGHTS_STEM}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                 for i in range(len(shards))]
        weight_map = {name: path.name for path, shard in zip(paths, shards) for name in shard}
        index = {"metadata": {"total_size": sum(_nbytes(t) for t in tensors.values())},
                 "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / f"{WEIGHTS_STEM}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for path, shard in zip(paths, shards):
        save_file(dict(shard), str(path), metadata={"format": "pt"})
    (out_dir / DESCRIPTION_FILE).write_text(json.dumps(description, indent=2))
    return paths


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _split(tensors: Mapping[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive shards of at most `limit` bytes (a larger tensor gets its own); limit 0 = one."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        if limit and shards[-1] and size + _nbytes(tensor) > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += _nbytes(tensor)
    return shards


def copy_side_files(model_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Copy config / tokenizer / template files; drop `quantization_config` from config.json
    (top level and under text_config) so the runtime auto-detects the description."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    copied = []
    for path in sorted(model_dir.iterdir()):
        if (path.is_file() and path.name.endswith(_COPIED_SUFFIXES) and "safetensors" not in path.name
                and path.name not in _NOT_COPIED and not path.name.startswith("quant_model_description")):
            shutil.copy2(path, out_dir / path.name)
            copied.append(path.name)
    config_path = out_dir / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config.pop("quantization_config", None)
        if isinstance(config.get("text_config"), dict):
            config["text_config"].pop("quantization_config", None)
        config_path.write_text(json.dumps(config, indent=2))
    return copied
