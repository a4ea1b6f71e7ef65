"""Calibration-aware WINT2 encoders: Hessian-weighted group-scale search and GPTQ compensation.

Both write the exact FastDeploy WINT2 layout of ascend_llm/numerics/wint2.py (decoded by
`dequantize_wint2`). What the layout lets a writer choose, for a weight [n, k]:
  * per output row n: code_scale / code_zp (its 256-entry codebook of 4-vectors in [-32, 31]^4,
    `numerics.wint2.codebook`) and super_scales[n];
  * per row and 64-column group g: a nibble 1..15, the group scale being nibble * super_scales[n];
  * per row and 4 consecutive columns (a "quad"): one byte, i.e. one codebook entry.
So WINT2 is a vector quantizer with 256 codewords per quad and a 4-bit scale per group.

Objective: the layer-output error ||(W - Q) X^T||^2 = tr((W - Q) H (W - Q)^T) with H = X^T X of
calibration inputs X [tokens, k]. With U the upper Cholesky factor of H^-1 (H^-1 = U^T U), GPTQ
quantizes columns left to right; for a quad at columns j..j+3 with block U_b = U[j:j+4, j:j+4]
and current (already compensated) weights w, choosing codeword q costs ||(w - q) U_b^-1||^2
(the four sequential one-column GPTQ steps, jointly), and the scaled error e = (w - q) U_b^-1
is pushed onto later columns: W[:, j+4:] -= e U[j:j+4, j+4:]. The sum of e^2 over the whole row
is that row's exact output error.

Group scales: at each group, the candidate nibbles (NIBBLE_OFFSETS around an amax-based guess,
or all 15) are tried at once (a batch dimension), each with the full within-group GPTQ; every
row keeps the nibble with the least group loss. `compensate=False` replaces U by
diag(1 / sqrt(H_jj)): the same search with the H-diagonal-weighted error and no error
propagation ("search" in the writer). calib/wint2/refine.py then revisits every decision.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ascend_llm.numerics import wint2 as L
from calib.hessians import DEFAULT_DAMP, check_hessian, damped, inverse_hessian_factor
from calib.wint2 import encode as E

# DAMP_NOTE: with few calibration tokens GPTQ overfits H. SmolLM2 MLP layers, H from 8 x 512
# calibration tokens, loss on 16 x 512 held-out tokens relative to the plain encoder's (GPTQ +
# 2 refinement passes): damp 0.01 -> 0.65 / 0.21 / 0.45 / 0.77 (layer 2 gate / down, layer 15
# gate / down), 0.1 -> 0.61 / 0.15 / 0.42 / 0.66, 0.3 -> 0.57 / 0.14 / 0.41 / 0.62 (while the loss
# on the calibration tokens themselves rises slightly). The writer's CalibSpec.damp defaults to 0.1.
NIBBLES = tuple(range(1, L.NIBBLE_MAX + 1))
# super_scales[n] = max over groups of amax(group) / SUPER_WINDOWS / 15: nibble 15 puts the
# row's largest weight SUPER_WINDOWS windows from the zero point (the codebook spans 32).
SUPER_WINDOWS = 24.0
# Nibbles tried per group: GUESS_WINDOWS-based guess (amax(group) / scale = GUESS_WINDOWS;
# GPTQ on SmolLM2 picks amax / scale in ~[32, 52], median 40) + NIBBLE_OFFSETS, clamped to 1..15.
# Cost is linear in the number of offsets; on SmolLM2 MLP layers (H of 8 x 512 tokens, GPTQ + 2
# refinement passes) 3 offsets give a loss 1.5-4 % above 7 offsets, at half the time.
GUESS_WINDOWS = 40.0
NIBBLE_OFFSETS = (-1, 0, 1)


@dataclass(slots=True)
class HessianEncodeResult:
    """The encoded tensors and the row losses (proxy output error, sum of e^2 per row)."""
    tensors: L.Wint2Tensors
    row_loss: torch.Tensor     # [n] float32


def diagonal_factor(hessian: torch.Tensor, damp: float = DEFAULT_DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """(diag(1 / sqrt(H_jj)) [k, k], dead mask): H-diagonal weighting, no error propagation."""
    h, dead = damped(hessian, damp)
    return torch.diag(torch.diagonal(h).rsqrt()).float(), dead


def super_scales_for(w: torch.Tensor, scale_dtype: torch.dtype,
                     windows: float = SUPER_WINDOWS) -> torch.Tensor:
    """[n, k] weight -> super_scales [n] in `scale_dtype` (nibble 15 = amax / `windows`)."""
    amax = w.abs().amax(1)                                                              # [n]
    return (amax / windows / L.NIBBLE_MAX).to(scale_dtype).clamp_min(torch.finfo(scale_dtype).tiny)


def encode_wint2_hessian(weight: torch.Tensor, hessian: torch.Tensor, *, compensate: bool = True,
                         scale_dtype: torch.dtype = torch.float32,
                         code_scale: float = E.DEFAULT_CODE_SCALES[0], damp: float = DEFAULT_DAMP,
                         super_windows: float = SUPER_WINDOWS,
                         nibble_offsets: tuple[int, ...] | None = NIBBLE_OFFSETS) -> HessianEncodeResult:
    """Float weight [n, k] and input Hessian H = X^T X [k, k] -> WINT2 tensors (module doc).

    compensate=True is GPTQ (per-group nibble search with in-group compensation, then the
    group's error pushed onto later columns); False is the H-diagonal-weighted scale search.
    nibble_offsets: the nibbles tried around each group's guess; None tries all 15.
    """
    n, k = weight.shape
    L.check_k(k)
    check_hessian(hessian, k)
    factor, dead = (inverse_hessian_factor if compensate else diagonal_factor)(hessian, damp)
    w = weight.float().clone()
    w[:, dead] = 0.0
    supers = super_scales_for(w, scale_dtype, super_windows)
    cs = torch.full((n,), code_scale, dtype=torch.float32)
    zp = torch.full((n,), E.code_zp_for(code_scale), dtype=torch.float32)
    book = L.codebook(cs[:1], zp[:1])[0]                                                # [256, 4]
    nibbles = torch.zeros(n, L.num_groups(k))
    codes = torch.zeros(n, k // L.PACK, dtype=torch.long)
    row_loss = torch.zeros(n)
    for g in range(L.num_groups(k)):
        a, b = g * L.GROUP_SIZE, min((g + 1) * L.GROUP_SIZE, k)
        candidates = nibble_candidates(w[:, a:b], supers.float(), nibble_offsets)        # [C, n]
        idx, err, loss = quantize_block(w[:, a:b], factor[a:b, a:b], candidates * supers.float(), book)
        best = loss.argmin(0)                                                           # [n]
        rows = torch.arange(n)
        nibbles[:, g] = candidates[best, rows]
        codes[:, a // L.PACK:b // L.PACK] = idx[best, rows]
        row_loss += loss[best, rows]
        if compensate and b < k:
            w[:, b:] -= err[best, rows] @ factor[a:b, b:]
    nibbles[weight.float().abs().amax(1) == 0] = 0.0          # all-zero rows decode to exactly 0
    tensors = L.Wint2Tensors(codes.to(torch.uint8).t().contiguous(), pack_nibbles(nibbles.t()),
                             supers.contiguous(), cs, zp)
    return HessianEncodeResult(tensors, row_loss)


def nibble_candidates(w: torch.Tensor, supers: torch.Tensor,
                      offsets: tuple[int, ...] | None) -> torch.Tensor:
    """Group weights [n, c], super scales [n] -> float nibbles to try [C, n] (1..15)."""
    if offsets is None:
        return torch.tensor(NIBBLES, dtype=torch.float32)[:, None].expand(len(NIBBLES), w.shape[0])
    guess = (w.abs().amax(1) / (GUESS_WINDOWS * supers)).round()                        # [n]
    shifts = torch.tensor(offsets, dtype=torch.float32)[:, None]                        # [C, 1]
    return (guess[None, :] + shifts).clamp(1, L.NIBBLE_MAX)


def quantize_block(w: torch.Tensor, factor: torch.Tensor, scales: torch.Tensor,
                   book: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ over one block of columns for every candidate scale at once.

    w [n, c] (c multiple of 4), factor [c, c] upper triangular, scales [C, n] (one scale per row)
    or [C, n, c/4] (one per row and quad: fixed group scales in a permuted order,
    calib/wint2/act_order.py), book [256, 4]
    -> (bytes [C, n, c/4] int64, scaled errors e [C, n, c], loss [C, n] = sum of e^2).
    """
    cands, n = scales.shape[:2]
    cols = w.shape[1]
    per_quad = scales if scales.dim() == 3 else scales[..., None].expand(cands, n, cols // L.PACK)
    work = w.unsqueeze(0).expand(cands, n, cols).clone()                                # [C, n, c]
    idx = torch.empty(cands, n, cols // L.PACK, dtype=torch.long)
    err = torch.empty(cands, n, cols)
    for j in range(0, cols, L.PACK):
        a_mat = torch.linalg.inv(factor[j:j + L.PACK, j:j + L.PACK])                   # [4, 4]
        book_a = book @ a_mat                                                           # [256, 4]
        target = work[:, :, j:j + L.PACK]                                               # [C, n, 4]
        scale = per_quad[:, :, j // L.PACK, None]                                       # [C, n, 1]
        score = (book_a * book_a).sum(-1) - 2 * ((target / scale) @ a_mat) @ book_a.t()
        choice = score.argmin(-1)                                                       # [C, n]
        e = (target - book[choice] * scale) @ a_mat                                     # [C, n, 4]
        idx[:, :, j // L.PACK] = choice
        err[:, :, j:j + L.PACK] = e
        if j + L.PACK < cols:
            work[:, :, j + L.PACK:] -= e @ factor[j:j + L.PACK, j + L.PACK:]
    return idx, err, (err * err).sum(-1)


def pack_nibbles(nibbles: torch.Tensor) -> torch.Tensor:
    """[G, n] values 0..15 -> uint8 [ceil(G/2), n]: even group in the high nibble, odd group in
    the low one, a missing last odd group written as 0 (numerics.wint2's weight_scale)."""
    groups, n = nibbles.shape
    nib = torch.cat([nibbles, nibbles.new_zeros(groups % 2, n)]).to(torch.int32)
    return ((nib[0::2] << 4) | nib[1::2]).to(torch.uint8).contiguous()


def output_error(weight: torch.Tensor, approx: torch.Tensor, x: torch.Tensor) -> float:
    """||x W^T - x approx^T|| / ||x W^T|| for inputs x [m, k]."""
    ref = x.float() @ weight.float().t()
    return float((ref - x.float() @ approx.float().t()).norm() / ref.norm())


def dequantize(tensors: L.Wint2Tensors) -> torch.Tensor:
    """WINT2 tensors -> float32 weight [n, k] (the loader's decode)."""
    return L.dequantize_wint2(tensors.quant_weight, tensors.weight_scale, tensors.super_scales,
                              tensors.code_scale, tensors.code_zp)
