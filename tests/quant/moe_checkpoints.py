"""Test-fixture writers of quantized MoE checkpoints, made from a float tiny MoE HF directory.

- `write_w4w2`: FastDeploy WINT2 `w4w2` with the documented quantization_config: experts of
  layers in the w4 range wint4 (`weight` packed [n, k/2] + `weight_scale` [n]), the rest WINT2
  (five tensors, FastDeploy's fused `experts.{e}.up_gate_proj.*` naming: gate columns first),
  dense layers (attention, dense MLPs, shared experts) pre-quantized wint8;
- `write_w8a8_dynamic`: msModelSlim ascendV1 with every decoder projection (experts included)
  W8A8_DYNAMIC, routers / norms / embeddings FLOAT.
Block FP8 (DeepSeek) and pre-quantized wint8 / wint4 come from tests/quant/prequant_writers.py,
whose projection regex covers the per-expert tensors too.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ascend_llm.loader import iter_safetensors_weights
from ascend_llm.numerics import primitives as P
from calib.wint2.encode import encode_wint2
from tests.quant.w8a8_writer import w8a8_dynamic_tensors

_PROJ = re.compile(r"^(model\.layers\.(\d+)\..*_proj)\.weight$")
_EXPERT = re.compile(r"^(model\.layers\.(\d+)\.mlp\.experts\.(\d+))\.(gate_proj|up_proj|down_proj)\.weight$")

# FastDeploy docs/quantization/wint2.md, verbatim
W4W2_CONFIG = {
    "quantization": "wint2", "dense_quant_type": "wint8", "moe_quant_type": "w4w2",
    "moe_quant_config": {
        "moe_w4_quant_config": {"quant_type": "wint4", "quant_granularity": "per_channel",
                                "quant_start_layer": 0, "quant_end_layer": 6},
        "moe_w2_quant_config": {"quant_type": "wint2", "quant_granularity": "pp_acc",
                                "quant_group_size": 64, "quant_start_layer": 7, "quant_end_layer": 53},
    },
}


def _copy_side_files(src: Path, out: Path, quant_config: dict | None) -> None:
    for path in src.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name != "config.json":
            shutil.copy2(path, out / path.name)
    config = json.loads((src / "config.json").read_text())
    if quant_config is not None:
        config["quantization_config"] = quant_config
    (out / "config.json").write_text(json.dumps(config, indent=2))


def _weight_only(w: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    q, scale = P.quantize_per_channel(w, bits)
    return {"weight": P.pack_int4(q) if bits == 4 else q, "weight_scale": scale}


def write_w4w2(src: Path, out: Path, w4_end_layer: int = 6, drop: str | None = None) -> Path:
    """The w4w2 checkpoint of `src` (config: W4W2_CONFIG with quant_end_layer = w4_end_layer).
    `drop` removes every tensor whose name contains it (for missing-tensor tests)."""
    out.mkdir(parents=True, exist_ok=True)
    state = dict(iter_safetensors_weights(src))
    tensors: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for name, w in state.items():
        expert = _EXPERT.match(name)
        proj = _PROJ.match(name)
        if expert and int(expert.group(2)) > w4_end_layer:
            if expert.group(4) == "down_proj":
                parts = encode_wint2(w).as_dict(f"{expert.group(1)}.down_proj.")
                tensors.update(parts)
            else:
                fused.setdefault(expert.group(1), {})[expert.group(4)] = w
        elif proj:
            bits = 4 if expert else 8
            tensors.update({f"{proj.group(1)}.{k}": v for k, v in _weight_only(w, bits).items()})
        else:
            tensors[name] = w
    for module, pair in fused.items():     # FastDeploy's up_gate_proj: [gate | up] along n
        encoded = encode_wint2(torch.cat([pair["gate_proj"], pair["up_proj"]]))
        tensors.update(encoded.as_dict(f"{module}.up_gate_proj."))
    if drop is not None:
        tensors = {k: v for k, v in tensors.items() if drop not in k}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    config = json.loads(json.dumps(W4W2_CONFIG))
    config["moe_quant_config"]["moe_w4_quant_config"]["quant_end_layer"] = w4_end_layer
    config["moe_quant_config"]["moe_w2_quant_config"]["quant_start_layer"] = w4_end_layer + 1
    config["is_permuted"] = False       # the wint8 / wint4 tensors above are row-major, not CUTLASS
    _copy_side_files(src, out, config)
    return out


def write_w8a8_dynamic(src: Path, out: Path) -> Path:
    """ascendV1 checkpoint: every decoder projection W8A8_DYNAMIC (experts too), the rest FLOAT."""
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    types: dict[str, str] = {}
    for name, w in iter_safetensors_weights(src):
        proj = _PROJ.match(name)
        if proj:
            for suffix, value in w8a8_dynamic_tensors(w).items():
                tensors[f"{proj.group(1)}.{suffix}"] = value.contiguous()
                types[f"{proj.group(1)}.{suffix}"] = "W8A8_DYNAMIC"
        else:
            tensors[name], types[name] = w.contiguous(), "FLOAT"
    save_file(tensors, str(out / "quant_model_weights.safetensors"))
    description = {"model_quant_type": "W8A8_DYNAMIC", "version": "1.0.0", "group_size": 0,
                   **dict(sorted(types.items()))}
    (out / "quant_model_description.json").write_text(json.dumps(description, indent=2))
    _copy_side_files(src, out, None)
    return out
