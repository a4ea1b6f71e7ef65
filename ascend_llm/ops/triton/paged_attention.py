"""Paged KV-cache write and attention over the block table, prefill and decode in one kernel.

Semantics of `ops/cpu.py` (`reshape_and_cache`, `paged_attention`) and, for an fp8 (e4m3) or
int8 cache, of `ops/cpu_kv_quant.py`: q = sat_e4m3(x / scale) or clamp(round(x / scale + offset))
on write; x = (q - offset) * scale on read, dequantized in the kernel to the query dtype.

Attention: one program per (sequence, kv head, tile of BLOCK_M query rows), where the rows are
(query token, query head of this kv head's group) pairs: a decode step fills a tile with the
group's heads (GQA), a prefill with tokens x heads. The program walks the sequence's context in
tiles of BLOCK_N positions, gathering each position's block through the block table, with an
online softmax in fp32 (FlashAttention-2 style) and the causal limit
key_pos <= context_len - query_len + token. A decode-only batch with too few (sequence, kv head)
programs to fill the GPU also splits each context across programs (flash-decoding): every split
writes its unnormalised partial output, running max and sum, and a merge kernel combines them.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ascend_llm.ops.attention_metadata import AttentionMetadata, KVCacheScales
from ascend_llm.ops.triton.fp8 import _round_to_e4m3
from ascend_llm.ops.triton.int8_gemm import _rint

# kv_cache_dtype -> how the kernels read the cache; e5m2 would need its own rounding
KV_MODES = {"auto": 0, "fp8": 1, "fp8_e4m3": 1, "int8": 2}
MAX_SPLITS = 16


@triton.jit
def _reshape_and_cache_kernel(x_ptr, cache_ptr, slot_ptr, scale_ptr, offset_ptr, row_size,
                              stride_xt, MODE: tl.constexpr, HAS_OFFSET: tl.constexpr,
                              BLOCK: tl.constexpr):
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    slot = tl.load(slot_ptr + token)
    mask = cols < tl.where(slot >= 0, row_size, 0)                 # slot < 0: padding token
    x = tl.load(x_ptr + token * stride_xt + cols, mask=mask, other=0.0)
    if MODE == 0:
        q = x.to(cache_ptr.dtype.element_ty)
    else:
        v = tl.div_rn(x.to(tl.float32), tl.load(scale_ptr + cols, mask=mask, other=1.0))
        if MODE == 1:
            q = _round_to_e4m3(tl.minimum(tl.maximum(v, -448.0), 448.0)).to(cache_ptr.dtype.element_ty)
        else:
            if HAS_OFFSET:
                v += tl.load(offset_ptr + cols, mask=mask, other=0.0)
            v = tl.minimum(tl.maximum(v, -128.0), 127.0)
            q = _rint(v).to(tl.int8)
    tl.store(cache_ptr + slot * row_size + cols, q, mask=mask)


def _per_channel(t: torch.Tensor | None, num_kv_heads: int, head_dim: int) -> torch.Tensor | None:
    """A [1] or [num_kv_heads, head_dim] scale / offset -> contiguous fp32 [num_kv_heads * head_dim]."""
    if t is None:
        return None
    return t.float().expand(num_kv_heads, head_dim).reshape(-1).contiguous()


def _write(x: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor, mode: int,
           scale: torch.Tensor | None, offset: torch.Tensor | None) -> None:
    num_tokens = x.shape[0]
    num_kv_heads, head_dim = cache.shape[-2:]
    if not cache.is_contiguous():
        raise ValueError("reshape_and_cache: the KV cache must be contiguous "
                         "[num_blocks, block_size, num_kv_heads, head_dim]")
    x2 = x.reshape(num_tokens, num_kv_heads * head_dim)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    row = num_kv_heads * head_dim
    block = min(1024, triton.next_power_of_2(row))
    scale_ = _per_channel(scale, num_kv_heads, head_dim)
    offset_ = _per_channel(offset, num_kv_heads, head_dim)
    if num_tokens:
        _reshape_and_cache_kernel[(num_tokens, triton.cdiv(row, block))](
            x2, cache, slot_mapping, x2 if scale_ is None else scale_,
            x2 if offset_ is None else offset_, row, x2.stride(0), MODE=mode,
            HAS_OFFSET=offset_ is not None, BLOCK=block)


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                      kv_scales: KVCacheScales | None = None) -> None:
    """Write key/value [num_tokens, num_kv_heads, head_dim] to the paged caches
    [num_blocks, block_size, num_kv_heads, head_dim] at flat slots [num_tokens] (slot < 0:
    skipped), quantized when `kv_scales` is given (cache dtype int8 or float8_e4m3fn)."""
    mode = _cache_mode(k_cache, kv_scales)
    s = kv_scales
    _write(key, k_cache, slot_mapping, mode, s and s.k_scale, s and s.k_offset)
    _write(value, v_cache, slot_mapping, mode, s and s.v_scale, s and s.v_offset)


def _cache_mode(cache: torch.Tensor, kv_scales: KVCacheScales | None) -> int:
    if kv_scales is None:
        return 0
    if cache.dtype == torch.float8_e4m3fn:
        return 1
    if cache.dtype == torch.int8:
        return 2
    raise ValueError(f"paged KV cache: dtype {cache.dtype} with scales; expected int8 or float8_e4m3fn")


@triton.jit
def _paged_attention_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr,
                            context_lens_ptr, query_start_ptr,
                            k_scale_ptr, v_scale_ptr, k_offset_ptr, v_offset_ptr,
                            part_ptr, part_ml_ptr, sm_scale, head_dim, block_size,
                            stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
                            stride_cb, stride_cs, stride_ch,
                            GROUP: tl.constexpr, MODE: tl.constexpr, HAS_OFFSET: tl.constexpr,
                            IEEE_FP32: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    seq, kv_head = tl.program_id(0), tl.program_id(1)
    tile, split = tl.program_id(2) // NUM_SPLITS, tl.program_id(2) % NUM_SPLITS
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    ctx_len = tl.load(context_lens_ptr + seq)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    token = rows // GROUP                                            # token within the sequence
    head = kv_head * GROUP + rows % GROUP
    row_valid = token < q_len
    if tile * BLOCK_M // GROUP < q_len:                              # else: a tile of padding only
        dims = tl.arange(0, BLOCK_D)
        d_mask = dims < head_dim
        q = tl.load(q_ptr + (q_start + token)[:, None] * stride_qt + head[:, None] * stride_qh
                    + dims[None, :], mask=row_valid[:, None] & d_mask[None, :], other=0.0)   # [BM, BD]
        q_pos = ctx_len - q_len + token                              # absolute position of each row
        if MODE != 0:
            chan = kv_head * head_dim + dims
            k_scale = tl.load(k_scale_ptr + chan, mask=d_mask, other=0.0)
            v_scale = tl.load(v_scale_ptr + chan, mask=d_mask, other=0.0)
            if HAS_OFFSET:
                k_off = tl.load(k_offset_ptr + chan, mask=d_mask, other=0.0)
                v_off = tl.load(v_offset_ptr + chan, mask=d_mask, other=0.0)
        m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        last_token = tl.minimum(q_len - 1, (tile * BLOCK_M + BLOCK_M - 1) // GROUP)
        kv_end = ctx_len - q_len + last_token + 1                     # causal limit of this tile
        chunk = tl.cdiv(tl.cdiv(kv_end, NUM_SPLITS), BLOCK_N) * BLOCK_N   # this split's key range
        kv_lo = split * chunk
        kv_hi = tl.minimum(kv_lo + chunk, kv_end)
        for start in range(kv_lo, kv_hi, BLOCK_N):
            pos = start + tl.arange(0, BLOCK_N)                       # [BN] key positions
            pos_valid = pos < kv_hi
            block = tl.load(block_tables_ptr + seq * stride_bt + pos // block_size,
                            mask=pos_valid, other=0)
            kv_off = (block.to(tl.int64) * stride_cb + (pos % block_size) * stride_cs
                      + kv_head * stride_ch)
            kv_mask = pos_valid[:, None] & d_mask[None, :]
            k = tl.load(k_cache_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_cache_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
            if MODE != 0:
                kf, vf = k.to(tl.float32), v.to(tl.float32)
                if HAS_OFFSET:
                    kf -= k_off[None, :]
                    vf -= v_off[None, :]
                k = (kf * k_scale[None, :]).to(q.dtype)
                v = (vf * v_scale[None, :]).to(q.dtype)
            else:
                k, v = k.to(q.dtype), v.to(q.dtype)
            if IEEE_FP32:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = s * sm_scale                                          # [BM, BN] fp32
            visible = (pos[None, :] <= q_pos[:, None]) & pos_valid[None, :]
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if IEEE_FP32:
                pv = tl.dot(p, v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        out_mask = row_valid[:, None] & d_mask[None, :]
        if NUM_SPLITS == 1:
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(out_ptr + (q_start + token)[:, None] * stride_ot + head[:, None] * stride_oh
                     + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=out_mask)
        else:   # partial (unnormalised acc, running max, sum) of [token, head, split]
            part = ((q_start + token) * (GROUP * tl.num_programs(1)) + head) * NUM_SPLITS + split
            tl.store(part_ptr + part[:, None] * BLOCK_D + dims[None, :], acc, mask=out_mask)
            tl.store(part_ml_ptr + 2 * part, m_i, mask=row_valid)
            tl.store(part_ml_ptr + 2 * part + 1, l_i, mask=row_valid)


@triton.jit
def _merge_splits_kernel(part_ptr, part_ml_ptr, out_ptr, num_heads, head_dim, stride_ot, stride_oh,
                         NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    token, head = tl.program_id(0), tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    s_mask = splits < NUM_SPLITS
    part = (token * num_heads + head) * NUM_SPLITS + splits
    m = tl.load(part_ml_ptr + 2 * part, mask=s_mask, other=-1.0e30)
    l = tl.load(part_ml_ptr + 2 * part + 1, mask=s_mask, other=0.0)
    acc = tl.load(part_ptr + part[:, None] * BLOCK_D + dims[None, :],
                  mask=s_mask[:, None] & (dims[None, :] < head_dim), other=0.0)
    w = tl.exp(m - tl.max(m, axis=0))                                 # an empty split has l = 0
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty),
             mask=dims < head_dim)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _decode_splits(meta: AttentionMetadata, num_kv_heads: int, device: torch.device) -> int:
    """Split each sequence's context across programs (flash-decoding) when a pure decode batch
    has too few (sequence, kv head) programs to fill the GPU; at least 256 keys per split."""
    if meta.max_query_len != 1:
        return 1
    programs = meta.num_seqs * num_kv_heads
    splits = min(MAX_SPLITS, triton.cdiv(2 * _num_sms(device), programs),
                 triton.cdiv(meta.max_context_len, 256))
    return max(1, splits)


def paged_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float,
                    kv_scales: KVCacheScales | None = None, *, num_splits: int | None = None
                    ) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its cached context (prefill, decode
    or both in one batch); query [num_tokens, num_heads, head_dim] -> same shape.

    `num_splits` (decode-only batches) overrides the split-KV heuristic: each split attends to
    a slice of the context and a merge kernel combines the partial softmaxes."""
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"paged_attention: num_heads={num_heads} is not a multiple of "
                         f"num_kv_heads={num_kv_heads}")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("paged_attention: k_cache and v_cache need the same strides, head_dim contiguous")
    if query.stride(-1) != 1:
        query = query.contiguous()
    mode = _cache_mode(k_cache, kv_scales)
    group = num_heads // num_kv_heads
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if num_tokens == 0:
        return out
    rows = meta.max_query_len * group
    block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_n = 64 if block_d <= 64 else 32
    s = kv_scales
    per_ch = lambda t: None if t is None else _per_channel(t, num_kv_heads, head_dim)  # noqa: E731
    k_scale, v_scale = (per_ch(s.k_scale), per_ch(s.v_scale)) if s else (None, None)
    k_off, v_off = (per_ch(s.k_offset), per_ch(s.v_offset)) if s else (None, None)
    tables = meta.block_tables
    splits = _decode_splits(meta, num_kv_heads, query.device) if num_splits is None else num_splits
    if splits > 1 and meta.max_query_len != 1:
        raise ValueError(f"paged_attention: num_splits={splits} needs a decode-only batch "
                         f"(max_query_len 1, got {meta.max_query_len})")
    part = torch.empty(num_tokens * num_heads * splits * block_d if splits > 1 else 1,
                       dtype=torch.float32, device=query.device)
    part_ml = torch.empty(2 * num_tokens * num_heads * splits if splits > 1 else 1,
                          dtype=torch.float32, device=query.device)
    grid = (meta.num_seqs, num_kv_heads, triton.cdiv(rows, block_m) * splits)
    _paged_attention_kernel[grid](
        query, k_cache, v_cache, out, tables, meta.context_lens, meta.query_start_loc,
        k_scale if k_scale is not None else out, v_scale if v_scale is not None else out,
        k_off if k_off is not None else out, v_off if v_off is not None else out,
        part, part_ml, scale, head_dim, block_size, query.stride(0), query.stride(1),
        out.stride(0), out.stride(1), tables.stride(0), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), GROUP=group, MODE=mode, HAS_OFFSET=k_off is not None,
        IEEE_FP32=query.dtype == torch.float32, NUM_SPLITS=splits, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4, num_stages=2)
    if splits > 1:
        _merge_splits_kernel[(num_tokens, num_heads)](
            part, part_ml, out, num_heads, head_dim, out.stride(0), out.stride(1), NUM_SPLITS=splits,
            BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d)
    return out
