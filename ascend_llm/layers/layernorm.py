"""RMSNorm with an optional fused residual add."""
from __future__ import annotations

import torch
import torch.nn as nn

from ascend_llm.ops.registry import OpSet


class RMSNorm(nn.Module):
    """forward(x) -> norm(x); forward(x, residual) -> (norm(x + residual), x + residual).

    With `bias` (anti-outlier quantized checkpoints), norm(.) = rms_norm(.) * weight + bias; the
    bias never enters the residual stream.
    """

    def __init__(self, hidden_size: int, eps: float, ops: OpSet,
                 params_dtype: torch.dtype = torch.float32, bias: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=params_dtype), requires_grad=False)
        self.bias = (nn.Parameter(torch.zeros(hidden_size, dtype=params_dtype), requires_grad=False)
                     if bias else None)
        self._rms_norm = ops.get("rms_norm")
        self._add_rms_norm = ops.get("add_rms_norm")

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self._with_bias(self._rms_norm(x, self.weight, self.eps))
        normed, residual = self._add_rms_norm(x, residual, self.weight, self.eps)
        return self._with_bias(normed), residual

    def _with_bias(self, normed: torch.Tensor) -> torch.Tensor:
        return normed if self.bias is None else normed + self.bias
