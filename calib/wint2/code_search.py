"""Per-row code_scale search for the calibrated WINT2 encoders.

A row's code_scale / code_zp pick which 256 of the 2^15 window 4-tuples its bytes can reach
(calib/wint2/encode.py). GPTQ treats rows independently (error is only pushed along a row), and
its row loss is that row's exact damped output error, so encoding the whole weight once per
candidate code_scale and keeping, per row, the candidate with the lowest row loss is an exact
per-row search. Cost: one encode per candidate. super_scales depend on the weight alone, so
every candidate shares them; each row's code_zp is code_zp_for(its code_scale).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ascend_llm.numerics import wint2 as L
from calib.wint2 import encode as E
from calib.wint2 import gptq as G

# The writer's default: all three encode.CODE_SCALE_CANDIDATES. SmolLM2 MLP layers (GPTQ +
# 2 refinement passes per candidate), held-out loss relative to the first candidate alone:
# 0.966-0.978 on three layers. With act-order (none, group) and 64 x 512 calibration tokens,
# perplexity on 4096 eval_tempest tokens 210.3 -> 162.2 (benchmarks/results/wint2_quality_*.json).
DEFAULT_CODE_SCALES = E.CODE_SCALE_CANDIDATES


def encode_best_code_scale(encode: Callable[[float], G.HessianEncodeResult],
                           code_scales: tuple[float, ...]) -> G.HessianEncodeResult:
    """`encode(code_scale)` for every candidate; per row, the encoding with the lowest row loss."""
    if not code_scales:
        raise ValueError("code_scales: needs at least one candidate")
    best = encode(code_scales[0])
    for code_scale in code_scales[1:]:
        best = merge_rows(best, encode(code_scale))
    return best


def merge_rows(a: G.HessianEncodeResult, b: G.HessianEncodeResult) -> G.HessianEncodeResult:
    """Row by row (output channel), the lower-loss of two encodings of the same weight."""
    ta, tb = a.tensors, b.tensors
    better = b.row_loss < a.row_loss                                                     # [n]

    def pick(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y.where(better, x) if x.dim() == 1 else y.where(better[None, :], x)

    tensors = L.Wint2Tensors(pick(ta.quant_weight, tb.quant_weight).contiguous(),
                             pick(ta.weight_scale, tb.weight_scale).contiguous(),
                             pick(ta.super_scales, tb.super_scales).contiguous(),
                             pick(ta.code_scale, tb.code_scale).contiguous(),
                             pick(ta.code_zp, tb.code_zp).contiguous())
    return G.HessianEncodeResult(tensors, pick(a.row_loss, b.row_loss))
