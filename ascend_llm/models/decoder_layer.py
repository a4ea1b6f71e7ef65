"""The pre-norm decoder block every supported model shares."""
from __future__ import annotations

import torch
import torch.nn as nn

from ascend_llm.models.forward_batch import ForwardBatch


class PreNormDecoderLayer(nn.Module):
    """norm -> self_attn -> add & norm -> mlp, with the residual carried alongside so the norms
    can fuse the add. Subclasses set `input_layernorm`, `self_attn`, `post_attention_layernorm`
    and `mlp`."""

    def forward(self, cos_sin: tuple[torch.Tensor, torch.Tensor], hidden: torch.Tensor,
                residual: torch.Tensor | None, kv_cache: tuple[torch.Tensor, torch.Tensor],
                batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(cos_sin, hidden, kv_cache, batch)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class DecoderStack(nn.Module):
    """Embedding -> decoder layers -> final norm. Subclasses set `embed_tokens`, `rotary_emb`,
    `layers` and `norm`."""

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        hidden = self.embed_tokens(batch.input_ids)      # [T, hidden]
        cos_sin = self.rotary_emb(batch.positions)       # shared by every layer
        residual = None
        for layer, kv_cache in zip(self.layers, batch.kv_caches):
            hidden, residual = layer(cos_sin, hidden, residual, kv_cache, batch)
        hidden, _ = self.norm(hidden, residual)
        return hidden
