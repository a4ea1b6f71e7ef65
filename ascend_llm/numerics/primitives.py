"""Pure quantize / dequantize functions shared by the quantization methods and kernels.

No module state, no layers: tensors in, tensors out. Conventions:
- weights are [n, k] = [out_features, in_features] (the torch Linear layout);
- every scale is a *dequant multiplier* (x ~= q * scale), stored float32;
- integer quantization is symmetric, no zero point;
- fp8 means float8_e4m3fn (finite max 448); values are clamped before the cast.
"""
from __future__ import annotations

import math

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0                       # torch.finfo(torch.float8_e4m3fn).max
FP8_MIN_SCALE = 1.0 / (FP8_MAX * 512.0)   # vLLM's floor for dynamic activation scales
FP8_FP16_RESCALE = 256.0              # fp8_to_float16_scaled(q) * 256 == q
_TINY = 1e-12                         # guards amax == 0 (all-zero row / block / tensor)


def int_qmax(bits: int) -> int:
    """Largest code of a symmetric `bits`-bit range: 127 (int8), 7 (int4). -2**(bits-1) is unused."""
    if bits not in (4, 8):
        raise ValueError(f"bits: only 4 and 8 are supported, got {bits}")
    return 2 ** (bits - 1) - 1


# ---------------------------------------------------------------- integer per-channel (WINT8 / WINT4)

def quantize_per_channel(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric quantization (FastDeploy / Paddle `weight_quantize` semantics).

    weight: [n, k] float -> (q int8 [n, k] in [-qmax, qmax], scale float32 [n]) with
    scale_n = amax_n / qmax and q = round(w / scale_n). An all-zero row gets a tiny scale (q = 0).
    """
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D [n, k] tensor, got shape {tuple(weight.shape)}")
    qmax = int_qmax(bits)
    w = weight.float()
    amax = w.abs().amax(dim=1).clamp_min(_TINY)                   # [n]
    scale = amax / qmax                                            # [n]
    q = torch.round(w / scale[:, None]).clamp_(-qmax, qmax).to(torch.int8)   # [n, k]
    return q, scale


def dequantize_per_channel(q: torch.Tensor, scale: torch.Tensor,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q: int8 [n, k], scale: [n] -> q * scale as `dtype` [n, k]."""
    return (q.float() * scale.float()[:, None]).to(dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int4 codes two per byte along k (the input dim).

    q: int8 [n, k] with values in [-8, 7] -> uint8 [n, ceil(k / 2)].
    Byte j of row r holds k = 2j in its LOW nibble and k = 2j + 1 in its HIGH nibble, each as a
    4-bit two's-complement value (Paddle's `weight_quantize` pairs consecutive k the same way, low
    nibble even k, before its arch-specific CUTLASS interleave; that interleave and its +8 bias
    are a GPU layout and are not applied here). An odd k is padded with a zero code.
    """
    if q.dim() != 2:
        raise ValueError(f"q: expected a 2-D [n, k] tensor, got shape {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError("q: int4 codes must lie in [-8, 7]")
    n, k = q.shape
    if k % 2:
        q = torch.cat([q, q.new_zeros(n, 1)], dim=1)               # [n, k + 1]
    nibbles = (q.to(torch.int16) & 0xF).to(torch.uint8)            # [n, 2 * ceil(k/2)]
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)              # [n, ceil(k/2)]


def unpack_int4_halves(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split `pack_int4` bytes into their codes without interleaving them back.

    packed: uint8 [n, ceil(k/2)] -> (even-k codes, odd-k codes), each int8 [n, ceil(k/2)]; an
    odd k's padding code is 0. Sign extension by arithmetic shifts of the int8 view.
    """
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed: expected a uint8 [n, ceil(k/2)] tensor, got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    signed = packed.view(torch.int8)
    return (signed << 4) >> 4, signed >> 4


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of `pack_int4`: uint8 [n, ceil(k / 2)] -> int8 [n, k] (sign-extended nibbles)."""
    low, high = unpack_int4_halves(packed)                         # [n, ceil(k/2)] each
    if packed.shape[1] != (k + 1) // 2:
        raise ValueError(f"packed: {packed.shape[1]} bytes per row cannot hold k={k} int4 codes")
    return torch.stack([low, high], dim=2).flatten(1)[:, :k]       # [n, k] interleaved back


# ---------------------------------------------------------------- fp8 per-tensor

def fp8_cast(x: torch.Tensor) -> torch.Tensor:
    """Saturating cast to float8_e4m3fn (clamp to +-448 first)."""
    return x.float().clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_fp8_per_tensor(x: torch.Tensor, min_scale: float = _TINY
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """x: any shape -> (e4m3 same shape, scale float32 0-dim) with scale = amax / 448."""
    amax = x.float().abs().amax() if x.numel() else torch.tensor(0.0)
    scale = (amax / FP8_MAX).clamp_min(min_scale).to(torch.float32)
    return fp8_cast(x.float() / scale), scale


def fp8_to_float16_scaled(q: torch.Tensor) -> torch.Tensor:
    """e4m3 -> float16 equal to q * 2**-8 EXACTLY, by moving bits (torch's e4m3 -> float cast is
    scalar on CPU; this is a few vectorised int16 passes). Fold FP8_FP16_RESCALE (256) into a
    scale to get q's value. Every finite e4m3 code maps exactly (subnormals included: both
    formats' subnormal steps differ by the same 2**-8); NaN codes are never produced here.
    """
    bits = q.view(torch.uint8).to(torch.int16)
    return (((bits & 0x80) << 8) | ((bits & 0x7F) << 7)).view(torch.float16)


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q * scale (scale broadcastable to q) as `dtype`."""
    return (q.float() * scale.float()).to(dtype)


# ---------------------------------------------------------------- fp8 block-wise (DeepSeek / FastDeploy)

def num_blocks(size: int, block: int) -> int:
    """ceil(size / block)."""
    return math.ceil(size / block)


def _pad_to_blocks(w: torch.Tensor, block_n: int, block_k: int) -> torch.Tensor:
    n, k = w.shape
    pad_n, pad_k = num_blocks(n, block_n) * block_n - n, num_blocks(k, block_k) * block_k - k
    return torch.nn.functional.pad(w, (0, pad_k, 0, pad_n)) if pad_n or pad_k else w


def quantize_fp8_block(weight: torch.Tensor, block_size: tuple[int, int] = (128, 128)
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """128x128 block-wise e4m3 weight quantization.

    weight: [n, k] -> (q e4m3 [n, k], scale_inv float32 [ceil(n/bn), ceil(k/bk)]). The weight is
    zero-padded to whole blocks for the amax (partial edge blocks see only their real values);
    scale_inv = amax / 448 is the dequant multiplier of its block (DeepSeek's `weight_scale_inv`).
    """
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D [n, k] tensor, got shape {tuple(weight.shape)}")
    bn, bk = block_size
    n, k = weight.shape
    padded = _pad_to_blocks(weight.float(), bn, bk)                          # [NB*bn, KB*bk]
    nb, kb = padded.shape[0] // bn, padded.shape[1] // bk
    blocks = padded.view(nb, bn, kb, bk)                                      # [NB, bn, KB, bk]
    scale_inv = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp_min(_TINY)    # [NB, KB]
    q = fp8_cast(blocks / scale_inv[:, None, :, None]).view(nb * bn, kb * bk)
    return q[:n, :k].contiguous(), scale_inv


def expand_block_scale(scale_inv: torch.Tensor, shape: tuple[int, int],
                       block_size: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """scale_inv [NB, KB] -> per-element scale [n, k] (edge blocks cropped)."""
    n, k = shape
    bn, bk = block_size
    if scale_inv.shape != (num_blocks(n, bn), num_blocks(k, bk)):
        raise ValueError(f"scale_inv: shape {tuple(scale_inv.shape)} does not tile a {n}x{k} weight "
                         f"with {bn}x{bk} blocks")
    return scale_inv.float().repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]


def dequantize_fp8_block(q: torch.Tensor, scale_inv: torch.Tensor, block_size: tuple[int, int] = (128, 128),
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q e4m3 [n, k], scale_inv [NB, KB] -> [n, k] `dtype`."""
    return (q.float() * expand_block_scale(scale_inv, tuple(q.shape), block_size)).to(dtype)


# ---------------------------------------------------------------- fp8 dynamic activations per token group

def quantize_fp8_per_token_group(x: torch.Tensor, group_size: int = 128
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization per token per `group_size` channels.

    x: [m, k] -> (q e4m3 [m, k], scale float32 [m, ceil(k/group)]) with scale = max(amax/448,
    1/(448*512)) per group; a partial last group uses its real channels only.
    """
    if x.dim() != 2:
        raise ValueError(f"x: expected a 2-D [num_tokens, k] tensor, got shape {tuple(x.shape)}")
    m, k = x.shape
    g = num_blocks(k, group_size)
    padded = _pad_to_blocks(x.float(), 1, group_size).view(m, g, group_size)   # [m, G, group]
    scale = (padded.abs().amax(dim=2) / FP8_MAX).clamp_min(FP8_MIN_SCALE)       # [m, G]
    q = fp8_cast(padded / scale[:, :, None]).view(m, g * group_size)
    return q[:, :k].contiguous(), scale


def dequantize_fp8_per_token_group(q: torch.Tensor, scale: torch.Tensor, group_size: int = 128,
                                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q e4m3 [m, k], scale [m, G] -> [m, k] `dtype`."""
    k = q.shape[1]
    return (q.float() * scale.float().repeat_interleave(group_size, 1)[:, :k]).to(dtype)
