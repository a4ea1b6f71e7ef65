"""GPTQ rounding of the int8 weights of a W8A8 / W8A8_DYNAMIC / W8A16 calibration (`--w_method GPTQ
--a_bit 8`), llm-compressor's GPTQModifier scheme W8A8 in msModelSlim's format.

Per-output-channel symmetric int8 scales stay min-max (max |W_row| / 127, what the runtime and
vllm-ascend expect); GPTQ (calib/gptq.py, through weight_only.gptq_codes: act-order, dampening
retries) chooses the codes, on the Hessian of each group's calibration inputs as the quantized
layer will see them (after smoothing and, with --rotation, the online Hadamard). The Hessian's
tokens are scaled to unit norm as for W4A16 (weight_only.TOKEN_CAP), so massive-activation tokens
do not dominate it. The dequantized codes replace the model's weights and each plan keeps its
scale, so the export writes exactly these codes.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from calib.export import LinearPlan
from calib.gptq import output_error
from calib.model_spec import LinearGroup
from calib.weight_only import GPTQ_DAMP, TOKEN_CAP, decoder_hessians, gptq_codes, make_grid

logger = logging.getLogger(__name__)

INT8_TYPES = ("W8A8", "W8A8_DYNAMIC", "W8A16")


@dataclass
class GptqSummary:
    """Output errors (relative, on the calibration Hessian) of nearest rounding and of GPTQ, and
    per layer the dampening GPTQ needed (raised x10 from GPTQ_DAMP while the damped Hessian's
    Cholesky fails) and its input channels that saw no input (a singular Hessian's zero rows)."""

    layers: dict[str, tuple[float, float]] = field(default_factory=dict)   # name -> (rtn, gptq)
    damps: dict[str, float] = field(default_factory=dict)                  # name -> dampening used
    dead_channels: dict[str, int] = field(default_factory=dict)            # name -> channels with H[j, j] == 0

    def to_dict(self) -> dict:
        rtn = [r for r, _ in self.layers.values()]
        gptq = [g for _, g in self.layers.values()]
        mean = (lambda v: sum(v) / len(v) if v else 0.0)
        return {"mean_output_error_rtn": mean(rtn), "mean_output_error_gptq": mean(gptq),
                "damp_used": max(self.damps.values(), default=0.0), "layer_damp": dict(self.damps),
                "raised_damp": sorted(n for n, d in self.damps.items() if d > GPTQ_DAMP),
                "dead_input_channels": {n: c for n, c in self.dead_channels.items() if c},
                "layers": {n: list(v) for n, v in self.layers.items()}}


@torch.no_grad()
def gptq_int8(model: nn.Module, groups: list[LinearGroup], plans: Mapping[str, LinearPlan],
              batches: list[torch.Tensor], progress: bool = True) -> GptqSummary:
    """GPTQ-round, in place, the weight of every int8 Linear of `plans`; sets each plan's w_scale."""
    wanted = [g for g in groups if any(plans[n].quant_type in INT8_TYPES for n in g.names)]
    hessians = decoder_hessians(model, wanted, batches, progress, token_cap=TOKEN_CAP)
    modules = dict(model.named_modules())
    summary = GptqSummary()
    for group in tqdm(wanted, desc="gptq", disable=not progress):
        hessian = hessians[group.key]
        for name in group.names:
            if plans[name].quant_type not in INT8_TYPES:
                continue
            linear = modules[name]
            weight = linear.weight.detach().float().cpu()                      # [n, k]
            grid = make_grid(weight, 8, 0, True)                              # scale [n, 1] = max|W| / 127
            codes, damp = gptq_codes(weight, grid, hessian)
            values = grid.dequantize(codes)
            summary.damps[name] = damp
            summary.dead_channels[name] = int((torch.diagonal(hessian) <= 0).sum())
            summary.layers[name] = (output_error(weight, grid.dequantize(grid.codes(weight)), hessian),
                                    output_error(weight, values, hessian))
            linear.weight.data = values.to(linear.weight.device, linear.weight.dtype)
            plans[name].w_scale = grid.scale[:, 0].clone()
    logger.info("GPTQ int8: %d Linears, mean output error %.4g -> %.4g", len(summary.layers),
                summary.to_dict()["mean_output_error_rtn"], summary.to_dict()["mean_output_error_gptq"])
    return summary
