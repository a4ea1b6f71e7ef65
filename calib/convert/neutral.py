"""The format-neutral form a converter reads into and writes from."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

SCHEMES = ("int8_dynamic", "int8_static", "int8_weight_only", "int4_weight_only", "fp8_dynamic", "fp8_static")


@dataclass
class QuantLinear:
    """One quantized Linear: codes with a per-output-channel scale, or (weight-only schemes) a
    group-wise one with optional integer zero points.

    int8_static activations: x_q = clamp(round(x / input_scale) + input_zero_point, -128, 127);
    the layer computes input_scale * weight_scale * (x_q - zp) . W_q + bias. fp8_static: e4m3
    per-tensor weights (weight_scale all equal) and a static per-tensor activation input_scale.
    int4_weight_only: codes in [-7, 7] (FastDeploy wint4) or [-8, 7], held as int8.
    Weight-only schemes may be group-wise (`group_size` g > 0: `weight_scale` [n, k / g]) and
    asymmetric (`weight_zero_point` int8 [n, G], G = k / g or 1): W[r, c] = (W_q[r, c] -
    zp[r, c // g]) * scale[r, c // g], the dequantization of compressed-tensors and msModelSlim alike.
    """

    scheme: str                            # one of SCHEMES
    weight: torch.Tensor                   # [n, k] int8 (int4 codes too) or float8_e4m3fn
    weight_scale: torch.Tensor             # [n] float32
    bias: torch.Tensor | None = None       # [n] float32, added after the dequantized matmul
    input_scale: float | None = None       # int8_static / fp8_static only
    input_zero_point: int = 0              # int8_static only
    group_size: int = 0                    # weight-only: 0 = per channel
    weight_zero_point: torch.Tensor | None = None  # weight-only: [n, G] int8, None = symmetric

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {self.scheme!r} ({', '.join(SCHEMES)})")
        if (self.group_size or self.weight_zero_point is not None) and not self.weight_only:
            raise ValueError(f"{self.scheme}: group-wise scales and weight zero points are for "
                             f"weight-only schemes")

    @property
    def weight_only(self) -> bool:
        return self.scheme in ("int8_weight_only", "int4_weight_only")

    @property
    def bits(self) -> int:
        return 4 if self.scheme == "int4_weight_only" else 8

    def group_scales(self, group_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scale [n, k / g], zero point [n, k / g] | None) for group size g: a per-channel layer's
        values repeated over its groups (exact), a group-wise one's own when g is its group size."""
        n, k = self.weight.shape
        if self.group_size == group_size:
            return self.weight_scale.reshape(n, -1), self.weight_zero_point
        if self.group_size or k % group_size:
            raise ValueError(f"group size {self.group_size or 'per-channel'} cannot be written as "
                             f"group size {group_size} (k = {k})")
        groups = k // group_size
        zero = self.weight_zero_point
        return (self.weight_scale.reshape(n, 1).expand(n, groups).contiguous(),
                None if zero is None else zero.reshape(n, 1).expand(n, groups).contiguous())


@dataclass
class NeutralCheckpoint:
    """Every tensor of a checkpoint: float ones by name, quantized Linears by module name."""

    config: dict                                              # config.json without quantization_config
    floats: dict[str, torch.Tensor] = field(default_factory=dict)
    linears: dict[str, QuantLinear] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)        # module -> what the conversion changed
    # online Hadamard before some Linears, whose stored weights already hold W @ blockdiag(H_b):
    # {"block_size": b, "layers": [module names]} (ascendV1's `online_hadamard`), None if none
    online_hadamard: dict | None = None

    def model_dtype(self) -> torch.dtype:
        """config.json's torch_dtype (or dtype), float32 when absent."""
        name = self.config.get("torch_dtype") or self.config.get("dtype") or "float32"
        dtype = getattr(torch, str(name), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"config.json: torch_dtype {name!r} is not a float dtype")
        return dtype
