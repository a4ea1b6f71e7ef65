"""Paddle `weight_quantize`'s CUTLASS weight layout for wint8 / wint4 (FastDeploy `is_permuted`).

FastDeploy's pre-quantized dense wint8 / wint4 tensors (`{prefix}.quant_weight`) are exactly what
Paddle's `weight_quantize(x [k, n], algo, arch)` returns on the GPU: the per-channel codes
permuted and biased for the CUTLASS fpA_intB GEMM (`weight_only_linear` reads them as is). The
layout is the same for arch 75, 80, 86, 89 and 90 (`weight_permute_gpu` in Paddle's
paddle/phi/kernels/impl/weight_quantize_kernel_gpu_impl.h takes one branch for all five; the CPU
kernel paddle/phi/kernels/cpu/weight_quantize_kernel.cc gives the same bytes, checked against
paddlepaddle 3.3.1 in tests/fixtures/peer_checkpoints/fastdeploy/paddle_weight_quantize).
Volta (arch 70) has another layout, not handled here.

wint8, codes q [k, n] in [-127, 127] -> container int8 [n, k] (n*k bytes, flat):
    p(k) = 16 * (k // 16) + 2 * (k % 8) + (k % 16) // 8          (k order 0, 8, 1, 9, ... per 16)
    byte index = p % 64 + 128 * (p // 64) + 64 * (n % 2) + 2 * K * (n // 2)
    byte value = q + 128 (stored as uint8 bits)
wint4, codes q [k, n] in [-7, 7] -> container int8 [n / 2, k] (n*k/2 bytes, flat):
    `weight_quantize` first packs k pairs (low nibble even k) into bytes [k / 2, n]; byte (j, n) goes to
    p(j) = 16 * (j // 16) + 2 * (2 * (j % 4) + (j % 8) // 4) + (j % 16) // 8
    byte index b = p % 32 + 128 * (p // 32) + 32 * (n % 4) + 2 * K * (n // 4)
    then, per 4-byte word, nibbles are regrouped and biased by +8: the nibble of k (half = k % 2)
    ends in byte 4 * (b // 4) + (b % 2) + 2 * half, in its high nibble iff b % 4 >= 2.
Both maps are bijections only for K % 64 == 0 and n % 2 == 0 (wint8) / n % 4 == 0 (wint4); other
shapes overrun (Paddle's own CPU kernel corrupts memory for K = 80), so they are refused.
"""
from __future__ import annotations

import torch

SUPPORTED_ARCHS = (75, 80, 86, 89, 90)
K_MULTIPLE = 64


def check_shape(k: int, n: int, bits: int) -> str | None:
    """Why a [k, n] weight has no CUTLASS layout (None when it has one)."""
    n_multiple = 2 if bits == 8 else 4
    if bits not in (4, 8):
        return f"bits must be 4 or 8, got {bits}"
    if k <= 0 or k % K_MULTIPLE:
        return f"the input size k={k} is not a positive multiple of {K_MULTIPLE}"
    if n <= 0 or n % n_multiple:
        return f"the output size n={n} is not a positive multiple of {n_multiple}"
    return None


def container_shape(k: int, n: int, bits: int) -> tuple[int, int]:
    """Shape of the int8 tensor `weight_quantize` returns for a [k, n] weight: [n, k] or [n / 2, k]."""
    return (n, k) if bits == 8 else (n // 2, k)


def wint8_byte_index(k: int, n: int) -> torch.Tensor:
    """[k, n] int64: flat byte index of code (k, n) in the wint8 container."""
    _require(k, n, 8)
    kk = torch.arange(k).unsqueeze(1)                                   # [k, 1]
    nn_ = torch.arange(n).unsqueeze(0)                                  # [1, n]
    p = 16 * (kk // 16) + 2 * (kk % 8) + (kk % 16) // 8
    return p % 64 + 128 * (p // 64) + 64 * (nn_ % 2) + 2 * k * (nn_ // 2)


def wint4_nibble_index(k: int, n: int) -> torch.Tensor:
    """[k, n] int64: flat nibble index (2 * byte + 1 for a high nibble) of code (k, n) in the
    wint4 container."""
    _require(k, n, 4)
    kk = torch.arange(k).unsqueeze(1)                                   # [k, 1]
    nn_ = torch.arange(n).unsqueeze(0)                                  # [1, n]
    j, half = kk // 2, kk % 2                                           # packed row, nibble
    p = 16 * (j // 16) + 2 * (2 * (j % 4) + (j % 8) // 4) + (j % 16) // 8
    b = p % 32 + 128 * (p // 32) + 32 * (nn_ % 4) + 2 * k * (nn_ // 4)
    byte = 4 * (b // 4) + b % 2 + 2 * half
    return 2 * byte + (b % 4) // 2


def permute(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes int8 [n, k] (our row-major orientation) -> Paddle's container int8 ([n, k] / [n/2, k])."""
    n, k = q.shape
    codes = q.t().to(torch.int64)                                       # [k, n]
    if bits == 8:
        flat = torch.empty(k * n, dtype=torch.int64)
        flat[wint8_byte_index(k, n).flatten()] = (codes + 128).flatten()
        return flat.to(torch.uint8).view(torch.int8).view(n, k)
    nibbles = torch.empty(k * n, dtype=torch.int64)
    nibbles[wint4_nibble_index(k, n).flatten()] = (codes + 8).flatten()
    pairs = nibbles.view(-1, 2)                                         # [bytes, (low, high)]
    return (pairs[:, 0] | (pairs[:, 1] << 4)).to(torch.uint8).view(torch.int8).view(n // 2, k)


def unpermute(container: torch.Tensor, k: int, n: int, bits: int) -> torch.Tensor:
    """Paddle's container (int8 or uint8 bytes) -> codes int8 [n, k]; values outside the symmetric
    range (-128 / -8, i.e. a stored 0) are kept so that the caller can reject them."""
    raw = container.contiguous().view(torch.uint8).flatten().to(torch.int64)
    if bits == 8:
        codes = raw[wint8_byte_index(k, n)] - 128                       # [k, n]
    else:
        nibbles = torch.stack([raw & 15, raw >> 4], dim=1).flatten()
        codes = nibbles[wint4_nibble_index(k, n)] - 8                   # [k, n]
    return codes.t().contiguous().to(torch.int8)                        # [n, k]


def _require(k: int, n: int, bits: int) -> None:
    reason = check_shape(k, n, bits)
    if reason is not None:
        raise ValueError(f"CUTLASS wint{bits} layout: {reason}")
