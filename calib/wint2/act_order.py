"""Act-order for the WINT2 GPTQ encoder: quantize the most active input columns first.

GPTQ's act-order processes columns by decreasing Hessian diagonal H_jj, so the columns whose
rounding matters most are decided while every other column can still absorb their error. WINT2
fixes two things an order must respect: a byte codes 4 consecutive columns (a quad), and a nibble
scales 64 consecutive columns (a group). The stored layout never changes: the encoder runs on the
permuted weight W[:, perm] with H[perm][:, perm], and the bytes / nibbles are put back in place.

Modes (`ACT_ORDERS`):
  none   the original column order (gptq.encode_wint2_hessian as is);
  group  groups by decreasing sum of H_jj, quads inside each group by decreasing quad sum; a
         group stays one contiguous block, so the per-group nibble search runs unchanged (a
         partial last group stays last);
  quad   GPTQ's act-order with static groups: the nibbles come from a "group" pass first, then
         every quad of the weight, in decreasing quad sum of H_jj across all groups, is
         re-quantized with its group's fixed scale; each row keeps the lower-loss of the two
         passes (both losses are the same exact damped output error).
"""
from __future__ import annotations

import torch

from ascend_llm.numerics import wint2 as L
from calib.hessians import check_hessian, inverse_hessian_factor
from calib.wint2 import gptq as G
from calib.wint2.refine import unpack_nibbles

ACT_ORDERS = ("none", "group", "quad")
DEFAULT_ACT_ORDER = "none"
# The writer tries these orders and keeps each row's best (gptq_writer.EncoderOptions).
# SmolLM2 MLP layers (H of 32 x 512 calibration tokens, + 2 refinement passes), loss on 8 x 512
# held-out tokens relative to "none": "group" alone 0.995 / 1.018 (layer 15 gate / layer 2 down),
# "quad" 0.989 / 1.046, the best of none and group per row 0.970-0.993 on three layers.
DEFAULT_ACT_ORDERS = ("none", "group")


def quad_strength(hessian: torch.Tensor) -> torch.Tensor:
    """[k, k] H -> [k/4] sum of H_jj over each quad's 4 columns."""
    return torch.diagonal(hessian).double().view(-1, L.PACK).sum(1)


def group_order(hessian: torch.Tensor) -> torch.Tensor:
    """Column permutation [k] (int64): full groups by decreasing H_jj sum, quads inside each group
    by decreasing quad sum, a partial last group kept last."""
    k = hessian.shape[0]
    strength = quad_strength(hessian)                                                    # [k/4]
    per_group = L.GROUP_SIZE // L.PACK
    full = k // L.GROUP_SIZE
    group_sum = torch.stack([strength[g * per_group:(g + 1) * per_group].sum() for g in range(full)]) \
        if full else strength.new_zeros(0)
    order = torch.argsort(group_sum, descending=True, stable=True).tolist() + list(range(full, L.num_groups(k)))
    quads: list[int] = []
    for g in order:
        start, stop = g * per_group, min((g + 1) * per_group, k // L.PACK)
        inner = torch.argsort(strength[start:stop], descending=True, stable=True) + start
        quads.extend(inner.tolist())
    return _columns(torch.tensor(quads, dtype=torch.long))


def quad_order(hessian: torch.Tensor) -> torch.Tensor:
    """Column permutation [k] (int64): quads by decreasing quad sum of H_jj, columns of a quad
    kept together and in order."""
    return _columns(torch.argsort(quad_strength(hessian), descending=True, stable=True))


def _columns(quads: torch.Tensor) -> torch.Tensor:
    return (quads[:, None] * L.PACK + torch.arange(L.PACK)).reshape(-1)


def encode_act_order(weight: torch.Tensor, hessian: torch.Tensor, act_order: str = DEFAULT_ACT_ORDER,
                     **kwargs) -> G.HessianEncodeResult:
    """gptq.encode_wint2_hessian with the columns visited in `act_order` (module doc);
    `kwargs` go to it. The tensors are in the original (stored) order."""
    if act_order not in ACT_ORDERS:
        raise ValueError(f"act_order: {act_order!r} is not one of {ACT_ORDERS}")
    n, k = weight.shape
    L.check_k(k)
    check_hessian(hessian, k)
    if act_order == "none" or not kwargs.get("compensate", True):
        return G.encode_wint2_hessian(weight, hessian, **kwargs)
    perm = group_order(hessian)
    permuted = G.encode_wint2_hessian(weight[:, perm], hessian[perm][:, perm], **kwargs)
    result = _unpermute(permuted, perm, k)
    if act_order == "quad":
        result = _static_group_pass(weight, hessian, result, kwargs.get("damp", G.DEFAULT_DAMP))
    return result


def _unpermute(result: G.HessianEncodeResult, perm: torch.Tensor, k: int) -> G.HessianEncodeResult:
    """Tensors of W[:, perm] (perm keeps quads and groups whole) -> tensors of W."""
    t = result.tensors
    quads = perm[0::L.PACK] // L.PACK                                                   # [k/4]
    groups = perm[0::L.GROUP_SIZE] // L.GROUP_SIZE                                      # [G]
    codes = torch.empty_like(t.quant_weight)
    codes[quads] = t.quant_weight
    nibbles = torch.empty(t.weight_scale.shape[1], L.num_groups(k))
    nibbles[:, groups] = unpack_nibbles(t.weight_scale, k)
    tensors = L.Wint2Tensors(codes.contiguous(), G.pack_nibbles(nibbles.t()), t.super_scales,
                             t.code_scale, t.code_zp)
    return G.HessianEncodeResult(tensors, result.row_loss)


def _static_group_pass(weight: torch.Tensor, hessian: torch.Tensor, first: G.HessianEncodeResult,
                       damp: float) -> G.HessianEncodeResult:
    """Re-quantize every quad in quad_order with the fixed nibbles of `first`; per row keep the
    lower-loss encoding."""
    t = first.tensors
    n, k = weight.shape
    perm = quad_order(hessian)
    factor, dead = inverse_hessian_factor(hessian[perm][:, perm], damp)
    w = weight.float()[:, perm].clone()
    w[:, dead] = 0.0
    nibbles = unpack_nibbles(t.weight_scale, k)                                         # [n, G]
    group_of_quad = torch.arange(k // L.PACK) * L.PACK // L.GROUP_SIZE                  # [k/4]
    scales = nibbles.clamp_min(1)[:, group_of_quad] * t.super_scales.float()[:, None]   # [n, k/4]
    quads = perm[0::L.PACK] // L.PACK
    book = L.codebook(t.code_scale[:1], t.code_zp[:1])[0]                               # [256, 4]
    if not bool((t.code_scale == t.code_scale[0]).all()):
        raise ValueError("act_order 'quad' needs one code_scale per encode call")
    idx, _, loss = G.quantize_block(w, factor, scales[:, quads][None], book)
    codes = t.quant_weight.t().long().clone()                                           # [n, k/4]
    codes[:, quads] = idx[0]
    better = loss[0] < first.row_loss                                                   # [n]
    codes = torch.where(better[:, None], codes, t.quant_weight.t().long())
    tensors = L.Wint2Tensors(codes.to(torch.uint8).t().contiguous(), t.weight_scale, t.super_scales,
                             t.code_scale, t.code_zp)
    return G.HessianEncodeResult(tensors, torch.where(better, loss[0], first.row_loss))
