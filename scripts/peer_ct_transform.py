"""compressed-tensors' own Hadamard transform as golden data for our `online_hadamard` (run by
scripts/make_ct_transform_fixtures.sh inside the llm-compressor virtualenv, never by the runtime).

Writes under --out (tests/fixtures/ct_transform/):
- hadamard_io.safetensors: for block b in (32, 512), `x_b{b}` (fixed float32 input [rows, k]) and
  `y_b{b}`, the output of compressed-tensors' `apply_transform_config` with
  TransformScheme(type="hadamard", head_dim=b, apply=[TransformArgs(location="input")]) on an
  identity nn.Linear(k, k): its forward pre-hook input transform, as a model runs it;
- llmcompressor_spinquant_r4/: a tiny random Llama quantized by llm-compressor's own
  SpinQuantModifier(rotations=["R4"], transform_block_size=32) + W8A8 (dynamic per-token int8),
  saved compressed, with reference.safetensors (input_ids [2, 8], `logits` of transformers'
  decompressed model with the config's ONLINE transforms applied by compressed-tensors, as vLLM
  runs it, and `logits_without_transform`: transformers alone, which ignores transform_config);
- with --converted DIR (our converter's output, tests/fixtures/ct_transform/converted_*): its
  quantization_config is validated with compressed-tensors' pydantic models (QuantizationConfig,
  TransformConfig) and the same two logits are saved as DIR/reference.safetensors;
- MANIFEST.json naming the tools and versions.

    python scripts/peer_ct_transform.py --out tests/fixtures/ct_transform [--converted DIR ...]
"""
from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import torch

BLOCKS = {32: (3, 96), 512: (2, 1024)}    # block -> input shape: the tiny Llama's, SmolLM2's down_proj


def hadamard_io(out: Path) -> None:
    from compressed_tensors.transform import TransformArgs, TransformConfig, TransformScheme, apply_transform_config
    from safetensors.torch import save_file
    tensors = {}
    for block, (rows, k) in BLOCKS.items():
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(block), dtype=torch.float32)
        linear = torch.nn.Linear(k, k, bias=False)
        with torch.no_grad():
            linear.weight.copy_(torch.eye(k))
        scheme = TransformScheme(type="hadamard", head_dim=block,
                                 apply=[TransformArgs(targets=["Linear"], location="input")])
        apply_transform_config(linear, TransformConfig(config_groups={"R4": scheme}))
        with torch.no_grad():
            tensors[f"x_b{block}"], tensors[f"y_b{block}"] = x, linear(x).contiguous()
    save_file(tensors, str(out / "hadamard_io.safetensors"))


def online_only(transform: dict):
    """compressed-tensors' TransformConfig keeping only the online entries (what vLLM applies: the
    offline ones are already in the saved weights)."""
    from compressed_tensors.transform import TransformArgs, TransformConfig
    config = TransformConfig.model_validate(transform)
    for scheme in config.config_groups.values():
        scheme.apply = [a for a in scheme.apply if TransformArgs.model_validate(a).is_online()]
    return config


def reference_logits(model_dir: Path, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.transform import apply_transform_config
    from transformers import AutoModelForCausalLM
    quant = json.loads((model_dir / "config.json").read_text())["quantization_config"]
    QuantizationConfig.model_validate({k: v for k, v in quant.items() if k != "transform_config"})
    transform = online_only(quant["transform_config"])
    out = {"input_ids": ids}
    for key, apply in (("logits_without_transform", False), ("logits", True)):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        if apply:
            apply_transform_config(model, transform)
        with torch.no_grad():
            out[key] = model(input_ids=ids).logits.float().contiguous()
    return out


def spinquant_r4(out: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform import SpinQuantModifier
    from peer_llmcompressor import calib_dataset, input_ids, tiny_model, tiny_tokenizer
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    case = out / "llmcompressor_spinquant_r4"
    shutil.rmtree(case, ignore_errors=True)
    float_dir = Path(tempfile.mkdtemp(prefix="spinquant-float-"))
    tiny_model("llama").save_pretrained(float_dir)
    model = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32).eval()
    recipe = [SpinQuantModifier(rotations=["R4"], transform_type="hadamard", transform_block_size=32),
              QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])]
    oneshot(model=model, recipe=recipe, dataset=calib_dataset(), num_calibration_samples=16,
            max_seq_length=32, processor=tiny_tokenizer())
    model.save_pretrained(case, save_compressed=True)
    for extra in ("recipe.yaml", "generation_config.json"):
        (case / extra).unlink(missing_ok=True)
    shutil.rmtree(float_dir)
    save_file(reference_logits(case, input_ids()), str(case / "reference.safetensors"))


def converted(model_dir: Path) -> None:
    from compressed_tensors.transform import TransformConfig
    from safetensors.torch import save_file
    sys.path.insert(0, str(Path(__file__).parent))
    from peer_llmcompressor import input_ids
    quant = json.loads((model_dir / "config.json").read_text())["quantization_config"]
    TransformConfig.model_validate(quant["transform_config"])        # raises on anything malformed
    save_file(reference_logits(model_dir, input_ids()), str(model_dir / "reference.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--converted", type=Path, nargs="*", default=[])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    hadamard_io(args.out)
    spinquant_r4(args.out)
    for model_dir in args.converted:
        converted(model_dir)
    manifest = {
        "tool": "compressed-tensors (transform factory, pydantic models) + llm-compressor (SpinQuantModifier R4) "
                "+ transformers (reader)",
        "compressed_tensors_version": version("compressed-tensors"), "llmcompressor_version": version("llmcompressor"),
        "transformers_version": version("transformers"), "torch_version": torch.__version__,
        "written_by": "scripts/peer_ct_transform.py", "date": datetime.date.today().isoformat(),
        "hadamard_io": {f"b{b}": list(shape) for b, shape in BLOCKS.items()},
        "converted": [str(p.name) for p in args.converted],
    }
    (args.out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
