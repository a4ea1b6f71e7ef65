"""WINT2 Linears whose bytes may change during distillation tuning (`TuneSpec.code_lr > 0`).

`ScaledCodeLinear` keeps a WINT2 Linear's decoded codes fixed and trains only its per-channel
scale. `Wint2CodeLinear` also lets the codes move, by straight-through rounding: a latent
weight in window units, `base_windows + shift` ([n, k/4, 4]; base_windows: the written bytes'
windows - 32; shift: trainable, from 0), is rounded every forward to the nearest byte of its column's 256-entry
codebook (`numerics.wint2.codebook`, exhaustive search as in the encoder); the forward uses the
rounded weight and the gradient passes to `shift` unchanged. The group nibbles, `code_scale` and
`code_zp` stay fixed, so the bytes are the only discrete change and the checkpoint keeps its
layout: `quant_weight()` is the new [k/4, n] uint8 tensor.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ascend_llm.numerics import wint2 as L
from calib.wint2 import encode as E
from calib.wint2.student import ScaledCodeLinear


class Wint2CodeLinear(ScaledCodeLinear):
    """y = (x @ (nibble * round(base_windows + shift)).T) * scale (+ bias), rounded to codebook bytes."""

    def __init__(self, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None) -> None:
        qweight = tensors["quant_weight"]                                   # [k/4, n] uint8
        n, k = qweight.shape[1], qweight.shape[0] * L.PACK
        ones = torch.ones(n, dtype=torch.float32)
        codes = L.dequantize_wint2(qweight, tensors["weight_scale"], ones, tensors["code_scale"],
                                   tensors["code_zp"])                      # [n, k]
        super().__init__(codes, tensors["super_scales"], bias)
        book = L.codebook(tensors["code_scale"], tensors["code_zp"])        # [n, 256, 4]
        nibble = L.group_scales(tensors["weight_scale"], ones, k)           # [G, n]
        nibble = nibble.repeat_interleave(L.GROUP_SIZE // L.PACK, 0)[:k // L.PACK].t()   # [n, k/4]
        written = qweight.t().long()                                        # [n, k/4]
        self.register_buffer("book", book)
        self.register_buffer("nibble", nibble.contiguous())
        self.register_buffer("base_windows", torch.gather(book, 1, written[..., None].expand(-1, -1, L.PACK)))
        self.register_buffer("bytes", written.clone())
        self.shift = nn.Parameter(torch.zeros(n, k // L.PACK, L.PACK))     # window units
        self._projected_version = -1
        del self.codes                                                      # rebuilt from the bytes

    def _project(self) -> None:
        """Round the latent weight to the nearest codebook byte (only after `shift` changed)."""
        if self._projected_version == self.shift._version:
            return
        with torch.no_grad():
            self.bytes.copy_(E.nearest_bytes(self.base_windows + self.shift, self.book)[0])
        self._projected_version = self.shift._version

    def rounded_windows(self) -> torch.Tensor:
        """[n, k/4, 4] windows - 32 of the current bytes."""
        self._project()
        return torch.gather(self.book, 1, self.bytes[..., None].expand(-1, -1, L.PACK))

    def forward(self, x: torch.Tensor) -> torch.Tensor:                    # [..., k] -> [..., n]
        latent = self.base_windows + self.shift                                     # [n, k/4, 4]
        windows = latent + (self.rounded_windows() - latent).detach()       # straight-through
        weight = (windows * self.nibble[..., None]).flatten(1)               # [n, k]
        out = F.linear(x, weight) * self.scale()
        return out if self.bias is None else out + self.bias

    def quant_weight(self) -> torch.Tensor:
        """The current bytes in the checkpoint's [k/4, n] uint8 layout."""
        self._project()
        return self.bytes.t().to(torch.uint8).contiguous()

    def num_changed(self, written: torch.Tensor) -> int:
        """How many bytes differ from `written` ([k/4, n] uint8)."""
        return int((self.quant_weight() != written).sum())
