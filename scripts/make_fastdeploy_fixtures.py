"""Write tiny FastDeploy-layout checkpoints from FastDeploy's and Paddle's code (not by FastDeploy).

FastDeploy needs Paddle on a GPU, so it cannot run here. This script writes, for a tiny random Llama
(tests/tiny_models.py shape with intermediate_size 128, so every k is a multiple of 64 as the
CUTLASS layout needs; vocab 128; seed 0), the tensors FastDeploy's loaders read, transcribed from:
  - fastdeploy/model_executor/layers/linear.py (LinearBase: `{prefix}.quant_weight`,
    `{prefix}.weight_scale` when is_quantized);
  - fastdeploy/model_executor/layers/quantization/weight_only.py (create_weights: weight [n, k]
    int8, [n / 2, k] for wint4; weight_scale [n] in the model dtype; process_prequanted_weights
    copies both as stored) and .../quantization/__init__.py (parse_quant_config: a
    quantization_config without is_quantized is pre-quantized);
  - Paddle paddle/phi/kernels/impl/weight_quantize_kernel_gpu_impl.h (per_channel_quant_gpu /
    per_channel_quant_gpu_int4_col_pack: q = lroundf(w / amax * qmax), scale = amax / qmax in the
    model dtype; weight_permute_kernel_wint8 / weight_permute_kernel_wint4 +
    weight_interval_kernel_wint4 for arch 75-90), re-implemented below in numpy from those kernels'
    index formulas (independently of ascend_llm/numerics/cutlass_weight_layout.py);
  - fastdeploy/model_executor/layers/quantization/block_wise_fp8.py (BlockWiseFP8Config.from_config:
    weight_block_size, is_quantized) with the torch-orientation tensors `weight` e4m3 [n, k] +
    `weight_scale_inv` [n / bn, k / bk] = amax / 448 (.../layers/utils.py per_block_cast_to_fp8).
Float tensors (embeddings, norms, lm_head) keep the HF (torch) names and orientation.

Per case <out>/<case>/: config.json (+ quantization_config), model.safetensors, MANIFEST.json,
reference/logits.safetensors: `input_ids` [2, 8], `float_logits` (the float model, transformers) and
`dequant_logits` (the same model with every quantized weight replaced by its dequantized value).

Usage: .venv/bin/python scripts/make_fastdeploy_fixtures.py --out tests/fixtures/peer_checkpoints/fastdeploy
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import platform
import re
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.tiny_models import init_tiny_weights, tiny_config  # noqa: E402

logger = logging.getLogger("make_fastdeploy_fixtures")
VOCAB, SEED, INTERMEDIATE = 128, 0, 128
FORMAT_SOURCES = {      # file -> the commit read (the versions stored by the code search, 2026-12-07)
    "PaddlePaddle/FastDeploy fastdeploy/model_executor/layers/linear.py": "0009064e6f6ed105cfa5d39c4a52021251e275a2",
    "PaddlePaddle/FastDeploy fastdeploy/model_executor/layers/quantization/weight_only.py":
        "00fb14ec319052d13ae47191db9453a30cf68623",
    "PaddlePaddle/FastDeploy fastdeploy/model_executor/layers/quantization/mix_quant.py":
        "071be356d78f7c1cc74683e9eb753b49d3e67d83",
    "PaddlePaddle/FastDeploy fastdeploy/model_executor/layers/quantization/__init__.py":
        "013ec98141e56d9b3a86bde08b82fc1bc6755a8e",
    "PaddlePaddle/FastDeploy fastdeploy/model_executor/layers/quantization/block_wise_fp8.py":
        "034a3bc7d17a3045dee887e2af9891a24392d2b7",
    "PaddlePaddle/FastDeploy fastdeploy/config.py": "0009064e6f6ed105cfa5d39c4a52021251e275a2",
    "PaddlePaddle/Paddle paddle/phi/kernels/impl/weight_quantize_kernel_gpu_impl.h":
        "2c8abd87b4a232e3fc8278c31ff24410f46254cf",
    "PaddlePaddle/Paddle paddle/phi/kernels/gpu/weight_quantize_kernel.cu": "04818d11b88899de5abe15926ce9b26a2af7aac2",
}
CASES = {
    "llama_wint8": {"quantization": "wint8"},
    "llama_wint4": {"quantization": "wint4"},
    "llama_block_wise_fp8": {"quantization": "block_wise_fp8", "weight_block_size": [32, 32]},
}
_LINEAR = re.compile(r"^model\.layers\.\d+\..*_proj\.weight$")


# ---------------------------------------------------------------- Paddle weight_quantize (GPU, arch 80)

def quantize_codes(w_kn: np.ndarray, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """per_channel_quant_gpu[_int4_col_pack]: w [k, n] float32 -> codes int64 [k, n], amax [n]."""
    amax = np.abs(w_kn).max(axis=0)
    v = w_kn / amax * qmax
    codes = np.clip(np.sign(v) * np.floor(np.abs(v) + 0.5), -qmax, qmax)         # lroundf
    return codes.astype(np.int64), amax


def permute_wint8(codes: np.ndarray) -> np.ndarray:
    """weight_permute_kernel_wint8: codes [K, N] -> int8 container [N, K]."""
    total_k, total_n = codes.shape
    k_id, n_id = np.meshgrid(np.arange(total_k), np.arange(total_n), indexing="ij")
    k_mod_16 = k_id % 16
    e1, e2 = k_mod_16 - k_mod_16 // 8 * 8, k_mod_16 // 8
    permute_kk = e1 + e2 + (e2 + 1) % 2 * k_mod_16 * 2 // 2 + e1 * e2 + k_id // 16 * 16
    index = permute_kk % 64 + permute_kk // 64 * 128 + 64 * (n_id % 2) + total_k * 2 * (n_id // 2)
    out = np.zeros(total_k * total_n, dtype=np.uint8)
    out[index.ravel()] = (codes + 128).astype(np.uint8).ravel()
    return out.view(np.int8).reshape(total_n, total_k)


def permute_wint4(codes: np.ndarray) -> np.ndarray:
    """per_channel_quant_gpu_int4_col_pack packing, weight_permute_kernel_wint4 and
    weight_interval_kernel_wint4: codes [K, N] -> int8 container [N / 2, K]."""
    total_k, total_n = codes.shape
    nib = (codes & 0x0F).astype(np.uint8)
    packed = nib[0::2] | (nib[1::2] << 4)                                          # [K/2, N]
    k_id, n_id = np.meshgrid(np.arange(total_k // 2), np.arange(total_n), indexing="ij")
    k_mod_8 = k_id % 8
    e1, e2 = k_mod_8 - k_mod_8 // 4 * 4, k_mod_8 // 4
    permute_kk = ((e1 + e2 + (e2 + 1) % 2 * k_mod_8 * 2 // 2 + e1 * e2) % 8 * 2
                  + (k_id % 16) // 8 + k_id // 16 * 16)
    index = permute_kk % 32 + permute_kk // 32 * 128 + 32 * (n_id % 4) + total_k * 2 * (n_id // 4)
    out = np.zeros(total_k * total_n // 2, dtype=np.uint8)
    out[index.ravel()] = packed.ravel()
    words = out.reshape(-1, 4).copy()                                             # interval kernel
    for pack in range(2):
        w0, w1 = words[:, pack].astype(np.int64), words[:, pack + 2].astype(np.int64)
        lo0, hi0, lo1, hi1 = ((v + 8) & 0x0F for v in (w0 & 0x0F, w0 >> 4, w1 & 0x0F, w1 >> 4))
        words[:, pack] = lo0 | (lo1 << 4)
        words[:, pack + 2] = hi0 | (hi1 << 4)
    return words.reshape(-1).view(np.int8).reshape(total_n // 2, total_k)


def weight_only(w: torch.Tensor, bits: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """HF weight [n, k] -> ({quant_weight, weight_scale}, dequantized [n, k] float32)."""
    qmax = 127 if bits == 8 else 7
    codes, amax = quantize_codes(w.t().double().numpy(), qmax)                     # [k, n], [n]
    scale = torch.from_numpy(amax / qmax).to(torch.bfloat16)                      # model dtype
    container = permute_wint8(codes) if bits == 8 else permute_wint4(codes)
    deq = torch.from_numpy(codes.T.astype(np.float32)) * scale.float()[:, None]
    return {"quant_weight": torch.from_numpy(container), "weight_scale": scale}, deq


def block_fp8(w: torch.Tensor, block: tuple[int, int]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """per_block_cast_to_fp8: w [n, k] -> ({weight e4m3, weight_scale_inv [n/bn, k/bk]}, dequantized)."""
    bn, bk = block
    n, k = w.shape
    blocks = w.float().reshape(n // bn, bn, k // bk, bk)
    amax = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-4)                           # [n/bn, k/bk]
    scale_inv = amax / 448.0
    q = (blocks / scale_inv[:, None, :, None]).to(torch.float8_e4m3fn).reshape(n, k)
    deq = (q.float().reshape(n // bn, bn, k // bk, bk) * scale_inv[:, None, :, None]).reshape(n, k)
    return {"weight": q, "weight_scale_inv": scale_inv}, deq


# ---------------------------------------------------------------- checkpoints

def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(SEED)
    config, cls = tiny_config("llama", vocab_size=VOCAB)
    config.intermediate_size = INTERMEDIATE
    model = cls(config).eval()
    init_tiny_weights(model, config.hidden_size)
    return model


def convert(model: torch.nn.Module, quant: dict) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    """(checkpoint tensors, a copy of `model` holding the dequantized weights)."""
    tensors: dict[str, torch.Tensor] = {}
    dequant = copy.deepcopy(model)
    params = dict(dequant.named_parameters())
    for name, w in model.state_dict().items():
        if not _LINEAR.match(name):
            tensors[name] = w.contiguous()
            continue
        prefix = name.removesuffix(".weight")
        if quant["quantization"] == "block_wise_fp8":
            parts, deq = block_fp8(w, tuple(quant["weight_block_size"]))
        else:
            parts, deq = weight_only(w, 8 if quant["quantization"] == "wint8" else 4)
        tensors.update({f"{prefix}.{k}": v.contiguous() for k, v in parts.items()})
        with torch.no_grad():
            params[name].copy_(deq)
    return tensors, dequant


def write_case(out: Path, case: str, quant: dict, model: torch.nn.Module, input_ids: torch.Tensor) -> None:
    directory = out / case
    (directory / "reference").mkdir(parents=True, exist_ok=True)
    tensors, dequant = convert(model, quant)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.update(architectures=[type(model).__name__], dtype="float32", quantization_config=quant)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    with torch.no_grad():
        logits = {"input_ids": input_ids, "float_logits": model(input_ids).logits,
                  "dequant_logits": dequant(input_ids).logits}
    save_file({k: v.contiguous() for k, v in logits.items()}, str(directory / "reference" / "logits.safetensors"))
    manifest = {
        "tool": "ascend-llm scripts/make_fastdeploy_fixtures.py (NOT written by FastDeploy or Paddle)",
        "format_from": FORMAT_SOURCES,
        "layout_checked_against": "tests/fixtures/peer_checkpoints/fastdeploy/paddle_weight_quantize "
                                  "(bytes written by paddlepaddle's own weight_quantize)",
        "quantization_config": quant,
        "model": {"arch": "llama", "vocab_size": VOCAB, "intermediate_size": INTERMEDIATE, "seed": SEED,
                  "shape": "tests/tiny_models.py tiny_config", "float_dtype": "float32",
                  "weight_scale_dtype": "bfloat16" if quant["quantization"] != "block_wise_fp8" else "float32"},
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "date": datetime.date.today().isoformat(),
    }
    (directory / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    logger.info("wrote %s (%d tensors)", directory, len(tensors))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = tiny_llama()
    input_ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    for case, quant in CASES.items():
        write_case(args.out, case, quant, model, input_ids)


if __name__ == "__main__":
    main()
