"""NeutralCheckpoint -> compressed-tensors (what vLLM and transformers load on GPU).

Layout, per Linear (the llm-compressor output this runtime reads, `quant/compressed_tensors.py`;
the fixtures in tests/fixtures/peer_checkpoints/llmcompressor/ show it):
- int-quantized: `weight` int8 [n, k], `weight_scale` [n, 1]; static activations add
  `input_scale` [1] and, when the zero point is not 0, `input_zero_point` int8 [1] (symmetric: false);
- float-quantized: `weight` e4m3 [n, k], `weight_scale` [n, 1], dynamic per-token fp8 activations;
- float-quantized static: e4m3 tensor weights with `weight_scale` [1] and `input_scale` [1];
- pack-quantized (8- or 4-bit weight-only, channel or group): `weight_packed` int32
  [n, ceil(k / f)], f = 32 / bits, holding code + 2^(bits-1), lowest bits first, `weight_scale`
  [n, 1] or [n, k / g], `weight_shape` [2]; asymmetric adds `weight_zero_point` int32
  [ceil(n / f), G], the signed zero points packed the same way along n.
Scales stay float32 (as read; nothing is re-rounded). A rotated checkpoint's `online_hadamard`
becomes the `transform_config` of llm-compressor's SpinQuant R4 (`transform_config.py`). One config group per scheme; a single
scheme targets "Linear" with the float Linears in `ignore`, several list their modules by name.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from calib.config import CalibError
from calib.convert.neutral import NeutralCheckpoint, QuantLinear
from calib.convert.transform_config import transform_config, transform_tensors

WEIGHTS_FILE = "model.safetensors"
_FORMATS = {"int8_dynamic": "int-quantized", "int8_static": "int-quantized",
            "int8_weight_only": "pack-quantized", "int4_weight_only": "pack-quantized",
            "fp8_dynamic": "float-quantized", "fp8_static": "float-quantized"}


def _args(num_bits: int, kind: str, strategy: str, dynamic: bool, symmetric: bool = True,
          group_size: int | None = None) -> dict:
    return {"num_bits": num_bits, "type": kind, "strategy": strategy, "symmetric": symmetric,
            "dynamic": dynamic, "group_size": group_size, "block_structure": None, "actorder": None}


def _group(scheme: str, asymmetric_inputs: bool, group_size: int = 0, asymmetric_weights: bool = False) -> dict:
    """A config group (without targets) for `scheme` (weight-only: its group size, zero points)."""
    inputs: dict | None
    if scheme == "int8_dynamic":
        weights, inputs = _args(8, "int", "channel", False), _args(8, "int", "token", True)
    elif scheme == "int8_static":
        weights = _args(8, "int", "channel", False)
        inputs = _args(8, "int", "tensor", False, symmetric=not asymmetric_inputs)
    elif scheme in ("int8_weight_only", "int4_weight_only"):
        weights = _args(8 if scheme == "int8_weight_only" else 4, "int", "group" if group_size else "channel",
                        False, symmetric=not asymmetric_weights, group_size=group_size or None)
        inputs = None
    elif scheme == "fp8_static":
        weights, inputs = _args(8, "float", "tensor", False), _args(8, "float", "tensor", False)
    else:
        weights, inputs = _args(8, "float", "channel", False), _args(8, "float", "token", True)
    return {"format": _FORMATS[scheme], "weights": weights, "input_activations": inputs,
            "output_activations": None}


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes [n, k] -> int32 [n, ceil(k / f)], f = 32 / bits, of unsigned code + 2^(bits-1)
    values, lowest bits first (the inverse of `quant.weight_only_group.unpack_int32`)."""
    n, k = codes.shape
    f = 32 // bits
    padded = torch.zeros(n, -(-k // f) * f, dtype=torch.int64)
    padded[:, :k] = codes.to(torch.int64) + (1 << (bits - 1))
    words = (padded.reshape(n, -1, f) << (torch.arange(f, dtype=torch.int64) * bits)).sum(dim=2)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def linear_tensors(linear: QuantLinear) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one Linear (leaf -> tensor)."""
    n, k = linear.weight.shape
    scale = linear.weight_scale.reshape(n, -1).to(torch.float32)                    # [n, 1] or [n, G]
    if linear.weight_only:
        out = {"weight_packed": pack_codes(linear.weight, linear.bits), "weight_scale": scale,
               "weight_shape": torch.tensor([n, k], dtype=torch.int64)}
        if linear.weight_zero_point is not None:                   # packed along n: [ceil(n / f), G]
            zero = linear.weight_zero_point.reshape(n, -1)
            out["weight_zero_point"] = pack_codes(zero.t().contiguous(), linear.bits).t().contiguous()
    elif linear.scheme == "fp8_static":
        out = {"weight": linear.weight, "weight_scale": _per_tensor(linear.weight_scale),
               "input_scale": torch.tensor([linear.input_scale], dtype=torch.float32)}
    else:
        out = {"weight": linear.weight, "weight_scale": scale}
    if linear.scheme == "int8_static":
        out["input_scale"] = torch.tensor([linear.input_scale], dtype=torch.float32)
        if linear.input_zero_point:
            out["input_zero_point"] = torch.tensor([linear.input_zero_point], dtype=torch.int8)
    if linear.bias is not None:
        out["bias"] = linear.bias.to(torch.float32)
    return out


def _per_tensor(scale: torch.Tensor) -> torch.Tensor:
    """A per-tensor fp8 weight scale [1] (every channel's scale must be the same)."""
    if not bool((scale == scale[0]).all()):
        raise CalibError("fp8 static per-tensor activations need a per-tensor weight scale "
                         "(compressed-tensors pairs static fp8 activations with tensor weights)")
    return scale[:1].to(torch.float32).clone()


def quantization_config(checkpoint: NeutralCheckpoint) -> dict:
    """config.json's `quantization_config` for the checkpoint's Linears."""
    by_group: dict[tuple[str, bool, int, bool], list[str]] = {}
    for module, linear in sorted(checkpoint.linears.items()):
        key = (linear.scheme, linear.scheme == "int8_static" and linear.input_zero_point != 0,
               linear.group_size, linear.weight_zero_point is not None)
        by_group.setdefault(key, []).append(module)
    float_linears = sorted(name.rpartition(".")[0] for name, t in checkpoint.floats.items()
                           if name.endswith(".weight") and t.dim() == 2 and "embed" not in name)
    single = len(by_group) == 1
    groups = {}
    for index, ((scheme, asym, group_size, asym_weights), modules) in enumerate(sorted(by_group.items())):
        groups[f"group_{index}"] = {"targets": ["Linear"] if single else modules,
                                    **_group(scheme, asym, group_size, asym_weights)}
    formats = {group["format"] for group in groups.values()}
    return {"quant_method": "compressed-tensors", "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed", "config_groups": groups,
            "ignore": sorted(set(float_linears) | {"lm_head"}) if single else ["lm_head"],
            "kv_cache_scheme": None, "sparsity_config": {},
            "transform_config": transform_config(checkpoint.online_hadamard) if checkpoint.online_hadamard else {}}


def _refuse_norm_biases(checkpoint: NeutralCheckpoint) -> None:
    """Anti-outlier norm biases (msModelSlim m2 / m4) have no parameter in vLLM's or transformers'
    Llama / Qwen2 RMSNorm: both would drop them silently and compute something else. They cannot
    be folded into the next Linear either (the activations were calibrated with the shift in)."""
    biases = sorted(name for name in checkpoint.floats if name.endswith("norm.bias"))
    if biases:
        raise CalibError(f"{biases[0]}: an anti-outlier norm bias ({len(biases)} such tensors) has no "
                         f"place in a compressed-tensors Llama / Qwen2 (vLLM and transformers RMSNorm "
                         f"have no bias); convert a checkpoint calibrated without m2 / m4")


def write_compressed_tensors(checkpoint: NeutralCheckpoint, dst: Path) -> dict[str, str]:
    """Write model.safetensors and config.json into `dst`; returns module -> written format."""
    _refuse_norm_biases(checkpoint)
    tensors = {name: t.contiguous() for name, t in checkpoint.floats.items()}
    if checkpoint.config.get("tie_word_embeddings") and "model.embed_tokens.weight" in tensors:
        tensors.pop("lm_head.weight", None)           # tied: the HF model re-creates it from the embedding
    written = {}
    for module, linear in checkpoint.linears.items():
        for leaf, value in linear_tensors(linear).items():
            tensors[f"{module}.{leaf}"] = value.contiguous()
        written[module] = _FORMATS[linear.scheme]
    if checkpoint.online_hadamard:
        tensors.update(transform_tensors(checkpoint.online_hadamard, checkpoint.model_dtype()))
    save_file(dict(sorted(tensors.items())), str(dst / WEIGHTS_FILE), metadata={"format": "pt"})
    config = dict(checkpoint.config, quantization_config=quantization_config(checkpoint))
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return written
