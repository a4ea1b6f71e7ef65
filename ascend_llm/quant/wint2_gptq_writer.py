"""The writer's calibrated WINT2 path: float model + calibration text -> WINT2 tensors per Linear.

`calibrate_wint2` loads the float checkpoint with transformers (float32, CPU), tokenizes the
calibration file, and runs quant/wint2_calibration.SequentialCalibrator with the encoder of
quant/wint2_gptq.py ("gptq": error compensation, then `refine_passes` rounds of coordinate
descent, quant/wint2_refine.py; "search": H-diagonal scale search only, no refinement).
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ascend_llm.quant import wint2_gptq as G
from ascend_llm.quant import wint2_layout as L
from ascend_llm.quant.wint2_calibration import CalibSpec, SequentialCalibrator, calibration_ids, read_texts
from ascend_llm.quant.wint2_refine import DEFAULT_PASSES, refine_wint2

logger = logging.getLogger(__name__)


def checkpoint_dtype(model_dir: Path) -> torch.dtype:
    """The dtype config.json names (torch_dtype / dtype), float32 if none."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    name = str(config.get("torch_dtype") or config.get("dtype") or "float32").replace("torch.", "")
    dtype = getattr(torch, name, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def make_encoder(method: str, scale_dtype: torch.dtype, refine_passes: int = DEFAULT_PASSES,
                 damp: float = G.DEFAULT_DAMP) -> Callable[[str, torch.Tensor, torch.Tensor], L.Wint2Tensors]:
    """(name, W [n, k], H [k, k]) -> WINT2 tensors with super_scales in `scale_dtype`."""
    if method not in ("search", "gptq"):
        raise ValueError(f"method: {method!r} is not a calibrated method ('search' or 'gptq')")

    def encode(name: str, weight: torch.Tensor, hessian: torch.Tensor) -> L.Wint2Tensors:
        result = G.encode_wint2_hessian(weight, hessian, compensate=method == "gptq", scale_dtype=scale_dtype,
                                        damp=damp)
        loss = float(result.row_loss.sum())
        if method == "gptq" and refine_passes:
            result = refine_wint2(weight, hessian, result.tensors, refine_passes, damp)
        logger.info("%s: %s loss %.4g -> refined %.4g", name, method, loss, float(result.row_loss.sum()))
        return result.tensors

    return encode


def calibrate_wint2(model_dir: Path, is_wint2: Callable[[str], bool], dense_bits: int, method: str,
                    calib: CalibSpec, refine_passes: int = DEFAULT_PASSES) -> dict[str, L.Wint2Tensors]:
    """{module name: WINT2 tensors} for every Linear `is_wint2` selects (module doc)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = calibration_ids(tokenizer, read_texts(calib.calib_file), calib.num_samples, calib.seq_len)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    encoder = make_encoder(method, checkpoint_dtype(model_dir), refine_passes, calib.damp)
    results = SequentialCalibrator(model, ids, is_wint2, encoder, dense_bits, calib.chunk).run()
    logger.info("calibrated %d WINT2 Linears on %d x %d tokens in %.1f s", len(results),
                ids.shape[0], ids.shape[1], time.perf_counter() - start)
    return results
