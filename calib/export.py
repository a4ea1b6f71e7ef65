"""Write the msModelSlim ascendV1 layout: quant_model_description.json, quant_model_weights
(.safetensors, or -0000i-of-0000N shards + index), config/tokenizer files without
`quantization_config`. Layout and dtypes: the per-Linear tensors that
`ascend_llm/quant/w8a8.py` loads (msModelSlim's ascendV1 saver,
msmodelslim/core/quant_service/modelslim_v1/save/ascendv1.py `AscendV1Saver`), checked against
vllm-ascend's lookups in tests/calib/test_vllm_ascend_conformance.py.

deq_scale dtype: float32 for a bfloat16 source model, int64 (float32 bits in the low 32 bits)
otherwise. msModelSlim's rule is "int64 unless the model dtype is bf16", so float16 and float32
sources both get int64; the runtime converts by value if it serves the checkpoint in another
dtype. Linear biases of quantized layers are float32 (the saver's `on_w8a8_*` write
`bias.to(torch.float32)`); other float tensors keep the model dtype.

Tied embeddings: `lm_head.weight` is written anyway (the embedding's values, "FLOAT"), as
msModelSlim does: vLLM builds a quantizable lm_head for tied models too and vllm-ascend's
ModelSlim config looks up `lm_head.weight` in the description.
"""
from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file
from tqdm import tqdm

from calib.quantize import kv_cache_tensors, layer_tensors

logger = logging.getLogger(__name__)

DESCRIPTION_FILE = "quant_model_description.json"
WEIGHTS_STEM = "quant_model_weights"
# model_quant_type is the highest-priority type present: msModelSlim's
# `AscendV1Saver.QUANT_TYPE_PRIORITY` / `update_quant_type` (modelslim_v1/save/ascendv1.py), lower
# bit widths last; W8A8FP8_DYNAMIC (vllm-ascend's name of the same format) takes WFP8AFP8's place.
# The v1 list has no W4A16 (only the classic saver writes it, as the model type of a w_bit 4,
# a_bit 16 run): it goes after the 8-bit integer and fp8 types, before the 4-bit float ones.
TYPE_PRIORITY = ("FLOAT", "W16A16S", "W8A16", "W8A8_DYNAMIC", "W8A8_MIX", "W8A8",
                 "WFP8AFP8_DYNAMIC", "W8A8FP8_DYNAMIC", "W4A16", "W8A8_MXFP8", "W4A8_MXFP", "W4A4_DYNAMIC",
                 "W4A4_MXFP4", "W4A4_MXFP4_DUALSCALE", "W4A4_MXFP4_SVD")
# MoFQ's FP8 layers: msModelSlim calls the format WFP8AFP8_DYNAMIC, vllm-ascend registers it as
# W8A8FP8_DYNAMIC (vllm_ascend/quantization/methods/w8a8fp8_dynamic.py) and knows no other name.
# We write the vllm-ascend name with its zero weight_offset; this runtime loads both names.
VLLM_ASCEND_FP8_TYPE = "W8A8FP8_DYNAMIC"
_COPIED_SUFFIXES = (".json", ".txt", ".jinja", ".model", ".py", ".tiktoken")
_NOT_COPIED = (DESCRIPTION_FILE,)


@dataclass
class LinearPlan:
    """How one decoder Linear is written: its type and (W8A8 static) activation range."""

    quant_type: str
    x_range: tuple[float, float] | None = None
    w_scale: torch.Tensor | None = None    # [n] int8 weight scale chosen by GPTQ (None: max |W_row| / 127)


def deq_scale_is_int64(source_dtype: torch.dtype) -> bool:
    """msModelSlim: int64 deq_scale unless the model dtype is bfloat16."""
    return source_dtype != torch.bfloat16


def build_checkpoint(model: nn.Module, plans: Mapping[str, LinearPlan],
                     kv_ranges: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None,
                     source_dtype: torch.dtype, progress: bool = True, kv_asymmetric: bool = False,
                     online_hadamard: Mapping[str, object] | None = None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """(tensors, description) of the (smoothed) HF `model` quantized as `plans` says.

    `kv_ranges` maps "model.layers.i.self_attn.k_proj" / "...v_proj" to per-channel (min, max)
    of the cache contents; given, C8 scales are written: symmetric (offset 0, msModelSlim's
    default) unless `kv_asymmetric`. Float tensors keep `source_dtype`; the biases of quantized
    Linears are float32. `online_hadamard` ({"block_size", "layers"}, calib/rotation.py) is
    written as the description key of that name: those layers' inputs are rotated at run time.
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
            written = VLLM_ASCEND_FP8_TYPE if plan.quant_type == "WFP8AFP8_DYNAMIC" else plan.quant_type
            parts = layer_tensors(plan.quant_type, tensor, bias, plan.x_range, deq_as_int64,
                                  fp8_offset=written == VLLM_ASCEND_FP8_TYPE, w_scale=plan.w_scale)
            for part, value in parts.items():
                if value.is_floating_point() and plan.quant_type == "FLOAT":
                    value = value.to(source_dtype)
                tensors[f"{module}.{part}"], types[f"{module}.{part}"] = value.contiguous(), written
        elif plan is not None and plan.quant_type != "FLOAT" and suffix == "bias":
            tensors[name], types[name] = tensor.detach().float().contiguous(), "FLOAT"
        else:   # embeddings, norms (+ anti-outlier norm bias), lm_head, float Linears' biases
            tensors[name], types[name] = tensor.detach().to(source_dtype).contiguous(), "FLOAT"
    _warn_dropped_biases(model, plans, state)
    description = quant_description(types)
    if online_hadamard:
        description["online_hadamard"] = dict(online_hadamard)
        logger.warning("online Hadamard before %d Linears (description key online_hadamard): the checkpoint "
                       "runs in ascend-llm only; vllm-ascend / MindIE ignore the key and would compute wrong "
                       "outputs", len(online_hadamard.get("layers", ())))
    if kv_ranges:
        if kv_asymmetric:
            logger.warning("C8 KV cache: asymmetric scales (non-zero kv_cache_offset) requested; "
                           "this runtime applies the offset, but vllm-ascend's C8 decode attention "
                           "passes the scale alone and ignores it: serve such checkpoints here only")
        for module, (c_min, c_max) in kv_ranges.items():
            for part, value in kv_cache_tensors(c_min, c_max, kv_asymmetric).items():
                tensors[f"{module}.{part}"], description[f"{module}.{part}"] = value.contiguous(), "C8"
        # both keys, as msModelSlim's saver writes them (ascendv1.py `on_dynamic_cache`);
        # vllm-ascend reads kv_cache_type (modelslim_config.py `_add_kvcache_quant_metadata`)
        description["kv_cache_type"] = "C8"
        description["kv_quant_type"] = "C8"
    return tensors, description


def _float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters by HF name, plus any `bias` tensor an anti-outlier method attached
    as a plain attribute; a tied lm_head is written with the embedding's values (named_parameters
    lists a shared tensor once)."""
    state = {name: p.detach().cpu().float() for name, p in model.named_parameters()}
    for name, module in model.named_modules():
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor) and f"{name}.bias" not in state:
            state[f"{name}.bias"] = bias.detach().cpu().float()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if "lm_head.weight" not in state and head is not None and getattr(head, "weight", None) is not None:
        # a copy: safetensors refuses two names for one storage (float32 models share it here)
        state["lm_head.weight"] = head.weight.detach().cpu().float().clone()
    return state


def _declared_biases(model: nn.Module) -> set[str] | None:
    """The bias parameters the model's architecture declares (built on the meta device), or
    None when it cannot be rebuilt."""
    try:
        with torch.device("meta"):
            fresh = type(model)(model.config)
    except Exception:                        # noqa: BLE001 - only a warning depends on it
        return None
    return {name for name, _ in fresh.named_parameters() if name.endswith(".bias")}


def _warn_dropped_biases(model: nn.Module, plans: Mapping[str, LinearPlan],
                         state: Mapping[str, torch.Tensor]) -> None:
    """Warn about Linear biases that anti-outlier shifts (m2 / m4) added to layers whose
    architecture has none, where the bias is not also folded into a W8A8 `quant_bias`.

    vLLM builds those Linears without a bias parameter and its Llama / Qwen2 `load_weights` skip
    a `.bias` tensor that has no parameter, so vllm-ascend silently computes without it; this
    runtime loads it (the description lists it).
    """
    added = [module for module, plan in plans.items()
             if plan.quant_type != "W8A8" and f"{module}.bias" in state]
    if not added:
        return
    declared = _declared_biases(model)
    if declared is not None:
        added = [module for module in added if f"{module}.bias" not in declared]
    if added:
        logger.warning("%d Linear(s) that the architecture builds without a bias got one from the "
                       "anti-outlier shift (%s%s); vLLM / vllm-ascend drop such biases silently, so "
                       "only this runtime serves the checkpoint correctly. For vllm-ascend use static "
                       "W8A8 (the bias folds into quant_bias) or a scale-only method (m1 / m3 / m6).",
                       len(added), ", ".join(added[:4]), ", ..." if len(added) > 4 else "")


def quant_description(types: Mapping[str, str], group_size: int = 0) -> dict[str, object]:
    """The description of tensors typed `types` (name -> written type): model_quant_type is the
    highest-priority type present, then version, group_size and the per-tensor types."""
    model_type = max(set(types.values()) | {"FLOAT"}, key=TYPE_PRIORITY.index)
    description: dict[str, object] = {"model_quant_type": model_type, "version": "1.0.0",
                                       "group_size": group_size}
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
