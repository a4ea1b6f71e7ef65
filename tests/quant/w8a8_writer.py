"""Test-side writer of msModelSlim ascendV1 checkpoints from a float HF directory.

Naive calibration: per-tensor min-max of every decoder Linear's input over a few random prompts
(transformers forward hooks), per-channel symmetric weights; msModelSlim's formulas (see
ascend_llm/quant/w8a8.py). No anti-outlier step, so no norm bias.
Writes `quant_model_description.json` + `quant_model_weights.safetensors` and copies the
config (without `quantization_config`) and tokenizer files.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from ascend_llm.quant.w8a8 import encode_deq_scale_int64

# msModelSlim v1 priority: the description's model_quant_type is the highest one present
_TYPE_PRIORITY = ("FLOAT", "W16A16S", "W8A16", "W8A8_DYNAMIC", "W8A8_MIX", "W8A8")
_EPS = torch.finfo(torch.float32).eps
_COPIED_SUFFIXES = (".json", ".txt", ".jinja", ".model", ".py")
# every decoder Linear of a Llama / Qwen2 layer (layer_types keys quantizing all of them)
ALL_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize_weight_symmetric(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: (q [n, k] int8, scale [n] float32 = max|W_row| / 127)."""
    w = weight.to(torch.float32)
    scale = (w.abs().amax(dim=1) / 127).clamp_min(_EPS)                     # [n]
    q = torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8)     # [n, k]
    return q, scale


def quantize_weight_asymmetric(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel asymmetric int8 (W8A16): (q [n, k], scale [n], offset [n]); W ~ (q - offset) * scale."""
    w = weight.to(torch.float32)
    w_min = w.amin(dim=1).clamp_max(0)
    w_max = w.amax(dim=1).clamp_min(0)
    scale = ((w_max - w_min) / 255).clamp_min(_EPS)                           # [n]
    offset = torch.round(-w_min / scale) - 128                                # [n]
    q = torch.round(w / scale[:, None] + offset[:, None]).clamp(-128, 127).to(torch.int8)
    return q, scale, offset


def activation_params(x_min: float, x_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor asymmetric int8 activation (input_scale [1], input_offset [1]), float32."""
    lo, hi = min(x_min, 0.0), max(x_max, 0.0)
    scale = torch.tensor([max((hi - lo) / 255, float(_EPS))], dtype=torch.float32)
    offset = torch.round(torch.tensor([-lo], dtype=torch.float32) / scale) - 128
    return scale, offset


def w8a8_static_tensors(weight: torch.Tensor, bias: torch.Tensor | None, x_min: float, x_max: float,
                        deq_as_int64: bool) -> dict[str, torch.Tensor]:
    """weight, input_scale, input_offset, deq_scale, quant_bias of one W8A8 static Linear."""
    q_w, w_scale = quantize_weight_symmetric(weight)
    input_scale, input_offset = (t.to(weight.device) for t in activation_params(x_min, x_max))
    deq = (input_scale * w_scale).to(torch.float32)                           # [n]
    b = (torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device) if bias is None
         else bias.to(torch.float64))
    row_sums = q_w.to(torch.float64).sum(dim=1)                               # [n]
    quant_bias = torch.round(b / deq.to(torch.float64) - input_offset.to(torch.float64) * row_sums)
    return {"weight": q_w, "input_scale": input_scale, "input_offset": input_offset,
            "deq_scale": encode_deq_scale_int64(deq) if deq_as_int64 else deq,
            "quant_bias": quant_bias.to(torch.int32)}


def w8a8_dynamic_tensors(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """weight, weight_scale [n, 1], weight_offset zeros [n, 1] of one W8A8_DYNAMIC Linear."""
    q_w, w_scale = quantize_weight_symmetric(weight)
    return {"weight": q_w, "weight_scale": w_scale[:, None],
            "weight_offset": torch.zeros_like(w_scale)[:, None]}


def w8a16_tensors(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """weight, weight_scale [n, 1], weight_offset [n, 1] of one (asymmetric) W8A16 Linear."""
    q_w, scale, offset = quantize_weight_asymmetric(weight)
    return {"weight": q_w, "weight_scale": scale[:, None], "weight_offset": offset[:, None]}


def calibrate_input_ranges(model: nn.Module, vocab_size: int, num_prompts: int = 4,
                           prompt_len: int = 24, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Linear module name -> (min, max) of its input over random prompts (decoder layers only)."""
    ranges: dict[str, tuple[float, float]] = {}

    def hook(name: str):
        def record(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            lo, hi = float(args[0].min()), float(args[0].max())
            old = ranges.get(name, (lo, hi))
            ranges[name] = (min(old[0], lo), max(old[1], hi))
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and ".layers." in n]
    gen = torch.Generator().manual_seed(seed)
    try:
        with torch.inference_mode():
            for _ in range(num_prompts):
                model(torch.randint(3, vocab_size, (1, prompt_len), generator=gen))
    finally:
        for handle in handles:
            handle.remove()
    return ranges


def _layer_type(module_name: str, layer_types: Mapping[str, str]) -> str:
    """The type for a Linear: the first `layer_types` key that the name ends with, else W8A8."""
    for suffix, quant_type in layer_types.items():
        if module_name.endswith(suffix):
            return quant_type
    return "W8A8"


def _quantized_tensors(quant_type: str, weight: torch.Tensor, bias: torch.Tensor | None,
                       x_range: tuple[float, float], deq_as_int64: bool) -> dict[str, torch.Tensor]:
    if quant_type == "W8A8":
        return w8a8_static_tensors(weight, bias, *x_range, deq_as_int64)
    if quant_type == "W8A8_DYNAMIC":
        return w8a8_dynamic_tensors(weight)
    if quant_type == "W8A16":
        return w8a16_tensors(weight)
    raise ValueError(f"writer: unsupported quant type {quant_type!r}")


def write_w8a8_checkpoint(float_dir: str | Path, out_dir: str | Path,
                          layer_types: Mapping[str, str] | None = None,
                          num_prompts: int = 4, seed: int = 0) -> Path:
    """Quantize the float HF model in `float_dir` into an ascendV1 checkpoint in `out_dir`.

    `layer_types` maps a Linear-name suffix (e.g. "mlp.down_proj", "layers.1.self_attn.o_proj")
    to "W8A8" | "W8A8_DYNAMIC" | "W8A16" | "FLOAT"; unmatched decoder Linears are W8A8.
    deq_scale is int64 (float32 bits) unless the model dtype is bfloat16, then float32.
    """
    float_dir, out_dir = Path(float_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32).eval()
    ranges = calibrate_input_ranges(model, model.config.vocab_size, num_prompts, seed=seed)
    deq_as_int64 = str(getattr(model.config, "torch_dtype", "")) not in ("bfloat16", "torch.bfloat16")
    return _write_quantized(float_dir, out_dir, _load_state(float_dir, "cpu"), ranges, layer_types or {},
                            deq_as_int64)


def write_uncalibrated_w8a8_checkpoint(float_dir: str | Path, out_dir: str | Path, quant_type: str,
                                       x_range: tuple[float, float] = (-4.0, 4.0),
                                       device: str = "cpu") -> Path:
    """Like write_w8a8_checkpoint with every decoder Linear of `quant_type`, but without running the
    model: static activation ranges are all `x_range`. For speed benchmarks of large random models
    (benchmarks/bench_cuda.py), where a calibration forward would cost minutes and quality is not
    measured. `device`: where the weights are quantized ("cuda" for a 7B model)."""
    float_dir, out_dir = Path(float_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = _load_state(float_dir, device)
    ranges = {name.rsplit(".", 1)[0]: x_range for name, t in state.items()
              if ".layers." in name and name.endswith("_proj.weight") and t.dim() == 2}
    config = json.loads((float_dir / "config.json").read_text())
    deq_as_int64 = config.get("torch_dtype", config.get("dtype")) != "bfloat16"
    return _write_quantized(float_dir, out_dir, state, ranges, {"": quant_type}, deq_as_int64)


def _load_state(float_dir: Path, device: str) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in sorted(float_dir.glob("*.safetensors")):
        state.update(load_file(str(path), device=device))
    return state


def _write_quantized(float_dir: Path, out_dir: Path, state: dict[str, torch.Tensor],
                     ranges: dict[str, tuple[float, float]], layer_types: Mapping[str, str],
                     deq_as_int64: bool) -> Path:
    """Quantize `state` and write weights, description and the float model's side files to out_dir."""
    tensors, description = _quantize_state(state, ranges, layer_types, deq_as_int64)
    save_file({name: t.cpu() for name, t in tensors.items()}, str(out_dir / "quant_model_weights.safetensors"))
    (out_dir / "quant_model_description.json").write_text(json.dumps(description, indent=2))
    _copy_side_files(float_dir, out_dir)
    return out_dir


def _quantize_state(state: dict[str, torch.Tensor], ranges: dict[str, tuple[float, float]],
                    layer_types: Mapping[str, str], deq_as_int64: bool
                    ) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """(output tensors, description) from the float state dict."""
    tensors: dict[str, torch.Tensor] = {}
    types: dict[str, str] = {}
    for name, tensor in state.items():
        module = name.rsplit(".", 1)[0]
        if module in ranges and name.endswith(".weight"):
            quant_type = _layer_type(module, layer_types)
            if quant_type == "FLOAT":
                tensors[name], types[name] = tensor.contiguous(), "FLOAT"
                continue
            parts = _quantized_tensors(quant_type, tensor, state.get(f"{module}.bias"),
                                       ranges[module], deq_as_int64)
            for suffix, value in parts.items():
                tensors[f"{module}.{suffix}"], types[f"{module}.{suffix}"] = value.contiguous(), quant_type
        else:   # embeddings, norms, lm_head, Linear biases: kept float
            tensors[name], types[name] = tensor.contiguous(), "FLOAT"
    present = set(types.values())
    model_type = max(present, key=_TYPE_PRIORITY.index)
    description: dict[str, object] = {"model_quant_type": model_type, "version": "1.0.0", "group_size": 0}
    description.update(sorted(types.items()))
    return tensors, description


def _copy_side_files(float_dir: Path, out_dir: Path) -> None:
    """Copy config/tokenizer files; drop `quantization_config` from config.json like msModelSlim v1."""
    for path in float_dir.iterdir():
        if path.is_file() and path.name.endswith(_COPIED_SUFFIXES) and "safetensors" not in path.name:
            shutil.copy2(path, out_dir / path.name)
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("quantization_config", None)
    if isinstance(config.get("text_config"), dict):
        config["text_config"].pop("quantization_config", None)
    config_path.write_text(json.dumps(config, indent=2))
