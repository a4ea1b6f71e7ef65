"""Test-side writer of ascendV1 checkpoints whose `mlp.down_proj` weights hold a folded block-diagonal
Hadamard rotation (W @ blockdiag(H_b)), listed under our description key `online_hadamard`.

Calibration sees the rotated inputs: the float HF model gets the rotated down_proj weights plus a
forward pre-hook rotating their input (the same function as the original model, exactly), and the
naive min-max calibration of tests/quant/w8a8_writer.py records the ranges after that hook.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from ascend_llm.numerics.hadamard import hadamard_transform_fwht, rotate_input_blocks
from tests.quant.w8a8_writer import _write_quantized, calibrate_input_ranges


def write_rotated_checkpoint(float_dir: str | Path, out_dir: str | Path, block_size: int,
                             layer_types: Mapping[str, str] | None = None, listed: bool = True) -> Path:
    """An ascendV1 checkpoint of `float_dir` with every down_proj rotated by H_`block_size`;
    `layer_types` as in write_w8a8_checkpoint (unmatched decoder Linears: W8A8 static); `listed`:
    write the `online_hadamard` key (False gives the broken checkpoint a loader must not run as is)."""
    float_dir, out_dir = Path(float_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32).eval()
    rotated = []
    for name, module in model.named_modules():
        if name.endswith("mlp.down_proj"):
            with torch.no_grad():
                module.weight.copy_(rotate_input_blocks(module.weight, block_size))
            module.register_forward_pre_hook(
                lambda _m, args: (hadamard_transform_fwht(args[0], block_size).to(args[0].dtype),))
            rotated.append(name)
    ranges = calibrate_input_ranges(model, model.config.vocab_size)
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    _write_quantized(float_dir, out_dir, state, ranges, layer_types or {}, deq_as_int64=True)
    if listed:
        path = out_dir / "quant_model_description.json"
        description = json.loads(path.read_text())
        description["online_hadamard"] = {"block_size": block_size, "layers": rotated}
        path.write_text(json.dumps(description, indent=2))
    return out_dir
