"""Per-step attention metadata, built once on the host and shared by all layers."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttentionMetadata:
    """Where each sequence's new tokens sit and which cached slots they attend to.

    num_seqs sequences contribute query_lens[i] new tokens each (num_tokens total,
    flattened in sequence order); sequence i attends to context_lens[i] cached tokens,
    the last query_lens[i] of which are its new ones.
    """
    slot_mapping: torch.Tensor        # [num_tokens] flat cache slot of each new token
    block_tables: torch.Tensor        # [num_seqs, max_num_blocks]
    context_lens: torch.Tensor        # [num_seqs] KV length after this step
    query_start_loc: torch.Tensor     # [num_seqs + 1] cumulative query lengths
    max_query_len: int
    max_context_len: int
    kv_block_ids: torch.Tensor        # [num_seqs * max_num_blocks] blocks to gather (padding: null block)
    attn_mask: torch.Tensor | None    # [num_seqs, 1, max_query_len, max_context_len] bool, None if dense
    query_pad_index: torch.Tensor     # [num_seqs, max_query_len] row in query (num_tokens = pad row)
    query_unpad_index: torch.Tensor   # [num_tokens] row in the flattened padded queries

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]

    @classmethod
    def build(cls, query_lens: list[int], context_lens: list[int], block_tables: list[list[int]],
              slot_mapping: list[int], block_size: int, null_block: int,
              device: torch.device) -> "AttentionMetadata":
        """Build from per-sequence host lists; block-table padding points at `null_block`."""
        num_seqs = len(query_lens)
        max_q, max_ctx = max(query_lens), max(context_lens)
        max_blocks = max(len(t) for t in block_tables)
        tables = torch.tensor([t + [null_block] * (max_blocks - len(t)) for t in block_tables],
                              dtype=torch.long)
        q_lens = torch.tensor(query_lens, dtype=torch.long)
        ctx_lens = torch.tensor(context_lens, dtype=torch.long)
        start_loc = torch.zeros(num_seqs + 1, dtype=torch.long)
        torch.cumsum(q_lens, 0, out=start_loc[1:])
        key_pos = torch.arange(max_ctx)
        # whole blocks are gathered: positions up to the ceil-block of max_ctx, masked past each end
        num_ctx_blocks = -(-max_ctx // block_size)
        q_idx = torch.arange(max_q)
        valid_q = q_idx.unsqueeze(0) < q_lens.unsqueeze(1)                     # [num_seqs, max_q]
        pad_index = torch.where(valid_q, start_loc[:-1].unsqueeze(1) + q_idx, start_loc[-1])
        unpad_index = (torch.arange(num_seqs).unsqueeze(1) * max_q + q_idx)[valid_q]
        mask = _causal_mask(q_lens, ctx_lens, valid_q, key_pos, max_q)
        return cls(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=device),
            block_tables=tables.to(device), context_lens=ctx_lens.to(device),
            query_start_loc=start_loc.to(device), max_query_len=max_q, max_context_len=max_ctx,
            kv_block_ids=tables[:, :num_ctx_blocks].reshape(-1).to(device), attn_mask=None if mask is None else mask.to(device),
            query_pad_index=pad_index.to(device), query_unpad_index=unpad_index.to(device))


def _causal_mask(q_lens: torch.Tensor, ctx_lens: torch.Tensor, valid_q: torch.Tensor,
                 key_pos: torch.Tensor, max_q: int) -> torch.Tensor | None:
    """[num_seqs, 1, max_q, max_ctx] bool; None when every key is visible to every query."""
    if max_q == 1 and bool((ctx_lens == ctx_lens[0]).all()):
        return None
    # absolute position of each query; padding queries sit at position 0 (so never fully masked)
    q_pos = torch.where(valid_q, ctx_lens.unsqueeze(1) - q_lens.unsqueeze(1) + torch.arange(max_q), 0)
    mask = key_pos.view(1, 1, -1) <= q_pos.unsqueeze(-1)                   # [num_seqs, max_q, max_ctx]
    mask &= key_pos.view(1, 1, -1) < ctx_lens.view(-1, 1, 1)
    return mask.unsqueeze(1)


@dataclass(slots=True)
class KVCacheScales:
    """Per-layer constants of a quantized paged KV cache, handed to the cache kernels.

    Stored value q and real value x relate as x ~= (q - offset) * scale (offset only for int8
    C8 checkpoints). Scales are float32 and broadcast against [..., num_kv_heads, head_dim]:
    shape [1] (per layer) or [num_kv_heads, head_dim] (per channel); offsets are None or
    [num_kv_heads, head_dim] float32 holding integers.
    """
    k_scale: torch.Tensor
    v_scale: torch.Tensor
    k_offset: torch.Tensor | None = None
    v_offset: torch.Tensor | None = None
