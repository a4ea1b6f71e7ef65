"""What one forward pass of the model needs, passed explicitly (no global context)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ascend_llm.ops.attention_metadata import AttentionMetadata


@dataclass(slots=True)
class ForwardBatch:
    """Flattened new tokens of every scheduled sequence plus their KV cache view."""
    input_ids: torch.Tensor                           # [num_tokens]
    positions: torch.Tensor                           # [num_tokens]
    attn_metadata: AttentionMetadata
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: [num_blocks, block_size, Hkv, D] x2
    logits_indices: torch.Tensor                      # [num_sampled] rows whose logits are needed
