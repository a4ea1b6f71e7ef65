"""How a pre-quantized wint8 / wint4 checkpoint stores one Linear's weight, read into our kernel layout.

FastDeploy (fastdeploy/model_executor/layers/linear.py, LinearBase: `weight_key =
f"{prefix}.quant_weight"`, `weight_scale_key = f"{prefix}.weight_scale"` when the model is
quantized; .../quantization/weight_only.py, `create_weights` / `process_prequanted_weights`)
stores a dense layer as
  `{prefix}.quant_weight`  int8, exactly Paddle `weight_quantize`'s output: [n, k] (wint8) or
                           [n / 2, k] (wint4), in the arch-specific CUTLASS layout
                           (numerics/cutlass_weight_layout.py), and
  `{prefix}.weight_scale`  [n] in the model dtype (amax / 127 or amax / 7).
`quantization_config.is_permuted` (FastDeploy's mix_quant default: true) says the layout is that
CUTLASS one; FastDeploy's dense wint8 / wint4 methods never undo it. `is_permuted: false` is our
row-major variant (what `weight_quantize` computes before its arch permutation, transposed):
wint8 int8 [n, k]; wint4 bytes [n, ceil(k / 2)], low nibble = even k, two's-complement nibbles.
Only there is an older ascend-llm name, `{prefix}.weight`, also accepted: with the CUTLASS default a
`weight` tensor is ambiguous and refused.

Our kernels take the row-major layout (`layer.weight` int8 [n, k] / uint8 [n, ceil(k/2)]), so a
CUTLASS tensor is converted once, per checkpoint tensor (one fused shard, all TP ranks), before
the layer's loader slices it. Codes must be symmetric: a -128 (int8) or -8 (int4) code cannot come
from FastDeploy's quantizer, so finding one means the tensor was written in the other layout.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ascend_llm.numerics import cutlass_weight_layout as C
from ascend_llm.numerics import primitives as P

QUANT_WEIGHT = "quant_weight"
LEGACY_WEIGHT = "weight"


@dataclass(frozen=True)
class WeightOnlyLayout:
    """The stored layout of pre-quantized wint8 / wint4 weights (`permuted`: FastDeploy's CUTLASS one)."""

    bits: int
    permuted: bool

    @property
    def key(self) -> str:
        return "is_permuted: true (FastDeploy's default)" if self.permuted else "is_permuted: false"

    def to_kernel(self, param: nn.Parameter, loaded: torch.Tensor, name: str) -> torch.Tensor:
        """A `load_check`: checkpoint tensor -> our row-major codes (int8 [n, k] / uint8 [n, k/2])."""
        if loaded.dim() != 2 or loaded.dtype not in (torch.int8, torch.uint8):
            raise ValueError(f"{name}: expected a 2-D int8 wint{self.bits} tensor ({self.key}), got "
                             f"{loaded.dtype} {tuple(loaded.shape)}")
        if self.permuted:
            return self._from_cutlass(loaded, name)
        return self._from_row_major(loaded, name)

    def _from_cutlass(self, loaded: torch.Tensor, name: str) -> torch.Tensor:
        rows, k = loaded.shape
        n = rows if self.bits == 8 else 2 * rows
        reason = C.check_shape(k, n, self.bits)
        if reason is not None:
            raise ValueError(f"{name}: FastDeploy's CUTLASS wint{self.bits} layout ({self.key}) is "
                             f"defined for k a multiple of {C.K_MULTIPLE} only; read as [n, k] = "
                             f"[{n}, {k}], {reason}")
        codes = C.unpermute(loaded, k, n, self.bits)                        # int8 [n, k]
        self._check_symmetric(codes, name)
        return codes if self.bits == 8 else P.pack_int4(codes)             # [n, k] / [n, k/2]

    def _from_row_major(self, loaded: torch.Tensor, name: str) -> torch.Tensor:
        if self.bits == 8:
            if loaded.dtype != torch.int8:
                raise ValueError(f"{name}: checkpoint tensor has dtype {loaded.dtype}, expected "
                                 f"torch.int8 (wint8, {self.key})")
            self._check_symmetric(loaded, name)
            return loaded
        packed = loaded.contiguous().view(torch.uint8)                      # [n, ceil(k/2)]
        low, high = P.unpack_int4_halves(packed)
        self._check_symmetric(torch.cat([low, high], dim=1), name)
        return packed

    def _check_symmetric(self, codes: torch.Tensor, name: str) -> None:
        lowest = -(2 ** (self.bits - 1))
        if bool((codes == lowest).any()):
            other = "is_permuted: false" if self.permuted else "is_permuted: true"
            raise ValueError(f"{name}: wint{self.bits} code {lowest} found when read with {self.key}; "
                             f"FastDeploy's symmetric codes lie in [{lowest + 1}, {-lowest - 1}], so "
                             f"this tensor was written in the other layout (set "
                             f"quantization_config.{other}?)")

    def refuse_legacy_name(self, param: nn.Parameter, loaded: torch.Tensor, name: str) -> torch.Tensor:
        """A `load_check` for `{prefix}.weight` when only `quant_weight` is valid."""
        quant_name = name.replace(f".{LEGACY_WEIGHT}", f".{QUANT_WEIGHT}", 1)
        raise ValueError(f"{name}: a pre-quantized wint{self.bits} checkpoint with {self.key} stores "
                         f"this layer as {quant_name!r} (+ 'weight_scale') in the CUTLASS layout; a "
                         f"'{LEGACY_WEIGHT}' tensor is ambiguous (an older ascend-llm row-major "
                         f"export, or a renamed FastDeploy tensor). If it is row-major, set "
                         f"quantization_config.is_permuted: false")


def read_is_permuted(config: dict, source: str) -> bool:
    """`quantization_config.is_permuted`, FastDeploy's default (true) when absent."""
    value = config.get("is_permuted", True)
    if not isinstance(value, bool):
        raise ValueError(f"{source}: quantization_config.is_permuted must be true or false, got {value!r}")
    return value
