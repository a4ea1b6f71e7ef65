"""The writer's calibrated WINT2 path: float model + calibration text -> WINT2 tensors per Linear.

`calibrate_wint2` loads the float checkpoint with transformers (float32, CPU), tokenizes the
calibration file, and runs calib/wint2/calibration.SequentialCalibrator with the encoder of
calib/wint2/gptq.py ("gptq": error compensation, then `refine_passes` rounds of coordinate
descent, calib/wint2/refine.py; "search": H-diagonal scale search only, no refinement), with
`EncoderOptions`' candidate act-orders (calib/wint2/act_order.py) and code_scales
(calib/wint2/code_search.py). With `CalibSpec.holdout_samples` the stream's last rows are kept
out of calibration (calib/wint2/calibration.split_calibration_ids).
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ascend_llm.numerics import wint2 as L
from calib.texts import read_calib_texts
from calib.wint2 import gptq as G
from calib.wint2.act_order import ACT_ORDERS, DEFAULT_ACT_ORDERS, encode_act_order
from calib.wint2.calibration import CalibSpec, SequentialCalibrator, split_calibration_ids
from calib.wint2.code_search import DEFAULT_CODE_SCALES, encode_best_code_scale, merge_rows
from calib.wint2.refine import DEFAULT_PASSES, refine_wint2

logger = logging.getLogger(__name__)


def checkpoint_dtype(model_dir: Path) -> torch.dtype:
    """The dtype config.json names (torch_dtype / dtype), float32 if none."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    name = str(config.get("torch_dtype") or config.get("dtype") or "float32").replace("torch.", "")
    dtype = getattr(torch, name, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


@dataclass(frozen=True, slots=True)
class EncoderOptions:
    """How each calibrated WINT2 Linear is encoded.

    Every (act_order, code_scale) pair is one candidate: encoded (calib/wint2/act_order.py),
    then refined `refine_passes` times (gptq only); each row keeps the candidate with the lowest
    loss (calib/wint2/code_search.py). The defaults are 2 x 3 candidates (about 3x the CPU time
    of the single pair act_orders=("none",), code_scales=encode.DEFAULT_CODE_SCALES).
    """
    method: str = "gptq"
    refine_passes: int = DEFAULT_PASSES
    damp: float = G.DEFAULT_DAMP
    act_orders: tuple[str, ...] = DEFAULT_ACT_ORDERS
    code_scales: tuple[float, ...] = DEFAULT_CODE_SCALES

    def __post_init__(self) -> None:
        if self.method not in ("search", "gptq"):
            raise ValueError(f"method: {self.method!r} is not a calibrated method ('search' or 'gptq')")
        bad = [a for a in self.act_orders if a not in ACT_ORDERS]
        if not self.act_orders or bad:
            raise ValueError(f"act_orders: {list(self.act_orders)} must be a non-empty subset of {ACT_ORDERS}")
        if not self.code_scales or any(cs * 256 != int(cs * 256) or not 1 <= cs <= 128 for cs in self.code_scales):
            raise ValueError(f"code_scales: {list(self.code_scales)} must be non-empty multiples of 1/256 in [1, 128]")
        if self.refine_passes < 0:
            raise ValueError(f"refine_passes: must be >= 0, got {self.refine_passes}")


def make_encoder(options: EncoderOptions,
                 scale_dtype: torch.dtype) -> Callable[[str, torch.Tensor, torch.Tensor], L.Wint2Tensors]:
    """(name, W [n, k], H [k, k]) -> WINT2 tensors with super_scales in `scale_dtype`."""
    gptq = options.method == "gptq"

    def candidate(weight: torch.Tensor, hessian: torch.Tensor, act_order: str,
                  code_scale: float) -> G.HessianEncodeResult:
        result = encode_act_order(weight, hessian, act_order, compensate=gptq, scale_dtype=scale_dtype,
                                  code_scale=code_scale, damp=options.damp)
        if gptq and options.refine_passes:
            result = refine_wint2(weight, hessian, result.tensors, options.refine_passes, options.damp)
        return result

    def encode(name: str, weight: torch.Tensor, hessian: torch.Tensor) -> L.Wint2Tensors:
        best = None
        for act_order in options.act_orders if gptq else ("none",):
            result = encode_best_code_scale(
                lambda cs, order=act_order: candidate(weight, hessian, order, cs), options.code_scales)
            best = result if best is None else merge_rows(best, result)
        logger.info("%s: %s loss %.4g", name, options.method, float(best.row_loss.sum()))
        return best.tensors

    return encode


def calibrate_wint2(model_dir: Path, is_wint2: Callable[[str], bool],
                    dense_bits: int | Callable[[str], int], method: str,
                    calib: CalibSpec, refine_passes: int = DEFAULT_PASSES,
                    options: EncoderOptions | None = None) -> dict[str, L.Wint2Tensors]:
    """{module name: WINT2 tensors} for every Linear `is_wint2` selects (module doc). `options`
    (if given) replaces method / refine_passes; its damp is calib.damp."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    options = replace(options or EncoderOptions(method, refine_passes), damp=calib.damp)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids, _ = split_calibration_ids(tokenizer, read_calib_texts(calib.calib_file), calib)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    encoder = make_encoder(options, checkpoint_dtype(model_dir))
    results = SequentialCalibrator(model, ids, is_wint2, encoder, dense_bits, calib.chunk).run()
    logger.info("calibrated %d WINT2 Linears on %d x %d tokens in %.1f s", len(results),
                ids.shape[0], ids.shape[1], time.perf_counter() - start)
    return results
