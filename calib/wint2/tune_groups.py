"""WINT2 Linears whose 4-bit group scales may change during distillation tuning (`TuneSpec.group_lr > 0`).

A WINT2 weight is `nibble[g] * super_scale * (window - 32)`, one uint4 nibble per 64 input rows
(ascend_llm/numerics/wint2.py). `ScaledCodeLinear` trains only the per-channel `super_scale`; this layer also
trains each group's nibble: a latent `nibble * (1 + group_delta)` ([n, G], group_delta trainable
from 0, so Adam's step is relative as for the scales), clamped to [0, 15] and rounded to an integer
every forward, the gradient passing the rounding unchanged (straight-through, as LSQ). The bytes,
`code_scale` and `code_zp` stay fixed, so the only discrete change is the nibbles and the
checkpoint keeps its layout: `weight_scale()` is the new packed [ceil(G/2), n] uint8 tensor.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ascend_llm.numerics import wint2 as L
from calib.wint2 import encode as E
from calib.wint2.student import ScaledCodeLinear


class Wint2GroupScaleLinear(ScaledCodeLinear):
    """y = (x @ (round(nibble * (1 + group_delta)) * windows).T) * scale (+ bias)."""

    def __init__(self, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None) -> None:
        qweight = tensors["quant_weight"]                                   # [k/4, n] uint8
        n, k = qweight.shape[1], qweight.shape[0] * L.PACK
        windows = L.codes_to_windows(L.decode_codes(qweight, tensors["code_scale"], tensors["code_zp"]))
        windows = (windows - L.WINDOW_ZP).t().float().contiguous()         # [n, k]
        nibble = L.group_scales(tensors["weight_scale"], torch.ones(n), k).t().contiguous()   # [n, G]
        super().__init__(windows, tensors["super_scales"], bias)           # codes = windows for now
        self.register_buffer("windows", self.codes)
        self.register_buffer("nibble_base", nibble)
        self.group_delta = nn.Parameter(torch.zeros_like(nibble))          # [n, G]
        self.in_features = k
        del self.codes                                                      # rebuilt from the nibbles

    def nibbles(self) -> torch.Tensor:
        """[n, G] integer-valued nibbles (straight-through: gradients reach group_delta)."""
        latent = (self.nibble_base * (1 + self.group_delta)).clamp(0, L.NIBBLE_MAX)
        return latent + (latent.round() - latent).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:                    # [..., k] -> [..., n]
        scale = self.nibbles().repeat_interleave(L.GROUP_SIZE, dim=1)[:, :self.in_features]   # [n, k]
        out = F.linear(x, self.windows * scale) * self.scale()
        return out if self.bias is None else out + self.bias

    def weight_scale(self) -> torch.Tensor:
        """The current nibbles in the checkpoint's packed [ceil(G/2), n] uint8 layout."""
        with torch.no_grad():
            return E.pack_nibbles(self.nibbles().t())

    def nibbles_changed(self) -> int:
        """How many nibbles differ from the written ones."""
        with torch.no_grad():
            return int((self.nibbles() != self.nibble_base).sum())
