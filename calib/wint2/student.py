"""The student's quantized Linear of WINT2 distillation tuning (calib/wint2/tune.py): decoded codes
fixed, per-output-channel scale trained. calib/wint2/tune_codes.py and tune_groups.py subclass it
to let the WINT2 bytes or group nibbles move too."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ScaledCodeLinear(nn.Module):
    """y = (x @ codes.T) * scale (+ bias): fixed decoded codes [n, k], trainable scale [n]."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("codes", codes.float())                       # [n, k]
        self.delta = nn.Parameter(torch.zeros(codes.shape[0]))            # [n]
        self.register_buffer("base", scale.detach().float().clone())      # [n]
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    def scale(self) -> torch.Tensor:
        return self.base * (1 + self.delta)                                # [n]

    def forward(self, x: torch.Tensor) -> torch.Tensor:                   # [..., k] -> [..., n]
        out = F.linear(x, self.codes) * self.scale()
        return out if self.bias is None else out + self.bias
