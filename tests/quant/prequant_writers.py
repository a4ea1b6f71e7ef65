"""Test-fixture writers: pre-quantized checkpoints made from a float HF directory.

- `write_autofp8`: AutoFP8 layout (`weight` e4m3, scalar `weight_scale`, static `input_scale`
  from a calibration pass of the float model through transformers), `ignored_layers`;
- `write_deepseek_fp8`: `weight` e4m3 + `weight_scale_inv` [ceil(n/bn), ceil(k/bk)];
- `write_fastdeploy_weight_only`: FastDeploy wint8 / wint4 `quant_weight` + `weight_scale` [n],
  row-major with an explicit `is_permuted: false` (wint4 two per byte, low nibble = even k), or
  with `permuted` FastDeploy's CUTLASS layout (numerics/cutlass_weight_layout.py, is_permuted true);
  MoE experts keep the row-major `weight` name our expert method reads.
Each copies the other tensors and the tokenizer, and adds `quantization_config` to config.json.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from ascend_llm.loader import iter_safetensors_weights
from ascend_llm.numerics import cutlass_weight_layout as C
from ascend_llm.numerics import primitives as P

_LINEAR = re.compile(r"^(model\.layers\.\d+\..*_proj)\.weight$")
Converter = Callable[[str, torch.Tensor], dict[str, torch.Tensor] | None]


def convert_linears(src: Path, out: Path, convert: Converter, quant_config: dict,
                    drop: tuple[str, ...] = ()) -> Path:
    """Copy `src` to `out`, replacing each decoder Linear `module.weight` by `convert(module, w)`
    (None keeps it float) and dropping tensor names ending with any of `drop`."""
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in iter_safetensors_weights(src):
        match = _LINEAR.match(name)
        converted = convert(match.group(1), tensor) if match else None
        if converted is None:
            tensors[name] = tensor.contiguous()
        else:
            tensors.update({f"{match.group(1)}.{k}": v.contiguous() for k, v in converted.items()})
    tensors = {k: v for k, v in tensors.items() if not k.endswith(drop)}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quant_config
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for path in src.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name != "config.json":
            shutil.copy2(path, out / path.name)
    return out


def calibrate_input_amax(src: Path, prompts: list[list[int]]) -> dict[str, float]:
    """amax |x| seen by every decoder Linear of the float model (transformers) on `prompts`."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(src), torch_dtype=torch.float32).eval()
    amax: dict[str, float] = {}

    def hook(name: str):
        def record(module, inputs):
            amax[name] = max(amax.get(name, 0.0), float(inputs[0].abs().max()))
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and _LINEAR.match(f"{n}.weight")]
    with torch.no_grad():
        for ids in prompts:
            model(torch.tensor([ids]))
    for h in handles:
        h.remove()
    return amax


def _ignored(module: str, ignored_layers: list[str]) -> bool:
    return any(re.match(e[3:], module) if e.startswith("re:") else e == module for e in ignored_layers)


def write_autofp8(src: Path, out: Path, static: bool = False, ignored_layers: list[str] | None = None,
                  prompts: list[list[int]] | None = None,
                  input_scale_factors: dict[str, float] | None = None) -> Path:
    """AutoFP8 checkpoint; `input_scale_factors` {module suffix: factor} perturbs static scales
    (to give fused shards different input scales)."""
    ignored = list(ignored_layers or [])
    amax = calibrate_input_amax(src, prompts or [[5, 9, 17, 33, 65, 129]]) if static else {}

    def convert(module: str, w: torch.Tensor) -> dict[str, torch.Tensor] | None:
        if _ignored(module, ignored):
            return None
        q, scale = P.quantize_fp8_per_tensor(w)                      # [n, k] e4m3, 0-dim
        tensors = {"weight": q, "weight_scale": scale}
        if static:
            factor = next((f for s, f in (input_scale_factors or {}).items() if module.endswith(s)), 1.0)
            tensors["input_scale"] = torch.tensor(amax[module] / P.FP8_MAX * factor, dtype=torch.float32)
        return tensors

    config = {"quant_method": "fp8", "activation_scheme": "static" if static else "dynamic",
              "ignored_layers": ignored}
    return convert_linears(src, out, convert, config)


def write_deepseek_fp8(src: Path, out: Path, block: tuple[int, int] = (128, 128)) -> Path:
    """DeepSeek-V3-style block FP8 checkpoint with `weight_block_size` = block."""
    def convert(module: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
        q, scale_inv = P.quantize_fp8_block(w, block)                 # [n, k], [NB, KB]
        return {"weight": q, "weight_scale_inv": scale_inv}

    config = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
              "weight_block_size": list(block)}
    return convert_linears(src, out, convert, config)


def write_fastdeploy_weight_only(src: Path, out: Path, bits: int, int4_as_int8: bool = False,
                                 permuted: bool = False, **extra: object) -> Path:
    """FastDeploy pre-quantized wint8 / wint4 checkpoint (`extra` goes into quantization_config);
    `int4_as_int8` stores the packed int4 bytes as int8 (Paddle's container dtype); `permuted`
    writes Paddle `weight_quantize`'s CUTLASS layout (needs k % 64 == 0) and is_permuted true."""
    def convert(module: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
        q, scale = P.quantize_per_channel(w, bits)                    # [n, k] int8, [n]
        expert = ".experts." in module             # experts: row-major `weight` only (moe_weight_only.py)
        if permuted and not expert:
            q = C.permute(q, bits)                                    # [n, k] / [n/2, k] int8
        elif bits == 4:
            packed = P.pack_int4(q)                                   # [n, ceil(k/2)] uint8
            q = packed.view(torch.int8) if int4_as_int8 else packed
        return {"weight" if expert else "quant_weight": q, "weight_scale": scale}

    config = {"quantization": f"wint{bits}", "is_quantized": True, "is_permuted": permuted, **extra}
    return convert_linears(src, out, convert, config)
