"""FastDeploy's offline WINT2 (CCQ, "convolutional code quantization") layout: the decoder.

Orientation and tensors (FastDeploy's on-disk [k, n], i.e. transposed from our [n, k] weights):

| tensor        | dtype       | shape              | meaning                                            |
|---------------|-------------|--------------------|----------------------------------------------------|
| quant_weight  | uint8       | [k/4, n]           | one byte b per 4 consecutive k rows of column n    |
| weight_scale  | uint8       | [ceil(k/128), n]   | two uint4 group scales per byte (group = 64 rows); |
|               |             |                    | even group in the HIGH nibble, odd group in the low |
| super_scales  | model dtype | [n]                | per output channel                                 |
| code_scale    | float32     | [n]                | per output channel                                 |
| code_zp       | float32     | [n]                | per output channel                                 |

Decode of byte b at packed row r, column n (FastDeploy `winx_unzip` / `wint2x_unzip.h`):
  c = floor(b * code_scale[n] + code_zp[n] + 0.5)            (float32 arithmetic, int32 result)
  window_j = (c >> shift_j) & 0x3F, shift = (9, 6, 3, 0) for k rows 4r, 4r+1, 4r+2, 4r+3
  w[k, n] = (nibble(k // 64, n) * super_scales[n]) * (window - 32)
Adjacent windows share 3 bits, so the 15-bit code c fixes all four weights of a byte; since b is
only 8 bits, column n can reach 256 of those codes: an arithmetic progression set by
(code_scale, code_zp). `k` must be a multiple of 4; we accept a partial last 64-group and an odd
number of groups (FastDeploy's tables assume k % 128 == 0): the unused low nibble of the last
weight_scale byte is written as 0.

The encoder (offline, writes checkpoints): calib/wint2/encode.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

GROUP_SIZE = 64           # k rows per uint4 group scale
PACK = 4                  # weights per byte
WINDOW_MASK = 0x3F
WINDOW_ZP = 32
SHIFTS = (9, 6, 3, 0)     # window of k row 4r + j is (c >> SHIFTS[j]) & 0x3F
NIBBLE_MAX = 15
TENSOR_NAMES = ("quant_weight", "weight_scale", "super_scales", "code_scale", "code_zp")


@dataclass(slots=True)
class Wint2Tensors:
    """The five WINT2 tensors of one [n, k] weight, FastDeploy orientation (see module doc)."""
    quant_weight: torch.Tensor      # [k/4, n] uint8
    weight_scale: torch.Tensor      # [ceil(k/128), n] uint8
    super_scales: torch.Tensor      # [n] model dtype
    code_scale: torch.Tensor        # [n] float32
    code_zp: torch.Tensor           # [n] float32

    def as_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """{prefix + name: tensor} in TENSOR_NAMES order."""
        return {f"{prefix}{name}": getattr(self, name) for name in TENSOR_NAMES}


def num_groups(k: int) -> int:
    """Number of 64-row groups (a partial last group counts)."""
    return -(-k // GROUP_SIZE)


def expected_shapes(k: int, n: int) -> dict[str, tuple[int, ...]]:
    """The on-disk shape of every WINT2 tensor of a [n, k] weight."""
    check_k(k)
    return {"quant_weight": (k // PACK, n), "weight_scale": (-(-k // (2 * GROUP_SIZE)), n),
            "super_scales": (n,), "code_scale": (n,), "code_zp": (n,)}


def check_k(k: int) -> None:
    """ValueError unless k (the input size) is a positive multiple of 4."""
    if k <= 0 or k % PACK:
        raise ValueError(f"wint2: input size k={k} must be a positive multiple of {PACK}")


# ---------------------------------------------------------------- decode

def decode_codes(quant_weight: torch.Tensor, code_scale: torch.Tensor,
                 code_zp: torch.Tensor) -> torch.Tensor:
    """uint8 [R, n] bytes -> int32 [R, n] codes c = floor(b * code_scale + code_zp + 0.5) in fp32."""
    b = quant_weight.to(torch.float32)
    return torch.floor(b * code_scale.float() + code_zp.float() + 0.5).to(torch.int32)


def codes_to_windows(codes: torch.Tensor) -> torch.Tensor:
    """int32 [R, n] codes -> int32 [4R, n] windows (row 4r + j = (c >> SHIFTS[j]) & 0x3F)."""
    windows = torch.stack([(codes >> s) & WINDOW_MASK for s in SHIFTS], dim=1)   # [R, 4, n]
    return windows.reshape(-1, codes.shape[-1])


def group_scales(weight_scale: torch.Tensor, super_scales: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [ceil(k/128), n] nibbles, [n] super scales -> float32 [G, n] group scales."""
    packed = weight_scale.to(torch.int32)
    nibbles = torch.stack([(packed >> 4) & 0xF, packed & 0xF], dim=1).reshape(-1, packed.shape[1])
    return nibbles[:num_groups(k)].to(torch.float32) * super_scales.to(torch.float32)   # [G, n]


def dequantize_wint2(quant_weight: torch.Tensor, weight_scale: torch.Tensor,
                     super_scales: torch.Tensor, code_scale: torch.Tensor,
                     code_zp: torch.Tensor) -> torch.Tensor:
    """The five WINT2 tensors -> float32 weight [n, k] (our orientation), FastDeploy's decode rule."""
    _check_tensors(quant_weight, weight_scale, super_scales, code_scale, code_zp)
    k = quant_weight.shape[0] * PACK
    windows = codes_to_windows(decode_codes(quant_weight, code_scale, code_zp))      # [k, n]
    scale = group_scales(weight_scale, super_scales, k).repeat_interleave(GROUP_SIZE, 0)[:k]
    return (scale * (windows - WINDOW_ZP).to(torch.float32)).t()                      # [n, k]


def wint2_matmul_reference(x: torch.Tensor, tensors: Wint2Tensors,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [m, k] @ dequantized(W).T (+ bias) in fp32, returned in x's dtype."""
    w = dequantize_wint2(tensors.quant_weight, tensors.weight_scale, tensors.super_scales,
                         tensors.code_scale, tensors.code_zp)                         # [n, k]
    y = F.linear(x.float(), w)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def _check_tensors(quant_weight: torch.Tensor, weight_scale: torch.Tensor,
                   super_scales: torch.Tensor, code_scale: torch.Tensor,
                   code_zp: torch.Tensor) -> None:
    if quant_weight.dtype != torch.uint8 or weight_scale.dtype != torch.uint8:
        raise ValueError(f"wint2: quant_weight and weight_scale must be uint8, got "
                         f"{quant_weight.dtype} and {weight_scale.dtype}")
    if quant_weight.dim() != 2:
        raise ValueError(f"wint2: quant_weight must be [k/4, n], got {tuple(quant_weight.shape)}")
    shapes = expected_shapes(quant_weight.shape[0] * PACK, quant_weight.shape[1])
    got = {"weight_scale": weight_scale, "super_scales": super_scales, "code_scale": code_scale,
           "code_zp": code_zp}
    for name, tensor in got.items():
        if tuple(tensor.shape) != shapes[name]:
            raise ValueError(f"wint2: {name} has shape {tuple(tensor.shape)}, expected "
                             f"{shapes[name]} for quant_weight {tuple(quant_weight.shape)}")


def codebook(code_scale: torch.Tensor, code_zp: torch.Tensor) -> torch.Tensor:
    """float32 [n, 256, 4] windows - 32 of every byte value, decoded with the decoder's formula."""
    n = code_scale.shape[0]
    b = torch.arange(256, dtype=torch.uint8)[:, None].expand(256, n)                # [256, n]
    windows = codes_to_windows(decode_codes(b, code_scale, code_zp))                  # [1024, n]
    return (windows.view(256, PACK, n).permute(2, 0, 1) - WINDOW_ZP).to(torch.float32)
