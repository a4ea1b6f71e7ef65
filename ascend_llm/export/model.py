"""The export form of a Llama-family model: prefill and decode graphs over explicit, contiguous K/V.

The runtime model attends through the `paged_attention` op over a block-paged KV cache that the
engine owns; that op (index tensors into a shared cache, in-place cache writes) has no ONNX
counterpart. In an exported graph the KV memory belongs to the consumer (MindSpore Lite / ACL, or
onnxruntime in tests), so the graphs here take the past K/V as inputs and return the present K/V
as outputs, and do attention with plain torch ops. Everything else is the runtime model's own
modules and weights: embedding, qkv_proj, the rotary cos/sin table and the `rope` op, o_proj,
the MLP and the LM head; the RMSNorms reuse their weights with the same math written in plain ops
(opset-17 ONNX has no RMSNormalization).

Graphs (float32, one K/V pair per decoder layer, K/V laid out [batch, kv_heads, len, head_dim]):
- prefill: input_ids [1, T], positions [1, T] -> logits [1, vocab] (last token), present_key_i /
  present_value_i [1, kv_heads, T, head_dim].
- decode: input_ids [B, 1], positions [B, 1], past_lens [B], past_key_i / past_value_i
  [B, kv_heads, P, head_dim] -> logits [B, vocab], present_key_i / present_value_i
  [B, kv_heads, P + 1, head_dim]. Row b's valid past is its first past_lens[b] entries (right
  padding); the new token's K/V is appended at index P, so with equal lengths (past_lens == P)
  the present K/V is the next step's past K/V as is.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ascend_llm.layers.layernorm import RMSNorm
from ascend_llm.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM


def export_rms_norm(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """rms_norm(x) * weight (+ bias) in plain ops; x: [..., hidden] fp32."""
    var = x.pow(2).mean(dim=-1, keepdim=True)
    out = x * torch.rsqrt(var + norm.eps) * norm.weight
    return out if norm.bias is None else out + norm.bias


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
            scale: float) -> torch.Tensor:
    """q: [B, H, Tq, D]; k, v: [B, KVH, Tk, D]; visible: [B, 1, Tq, Tk] bool -> [B, Tq, H * D]."""
    batch, num_heads, q_len, head_dim = q.shape
    group = num_heads // k.shape[1]
    k = k.repeat_interleave(group, dim=1)                       # [B, H, Tk, D]
    v = v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale       # [B, H, Tq, Tk]
    scores = scores.masked_fill(~visible, float("-inf"))
    out = torch.matmul(scores.softmax(dim=-1), v)               # [B, H, Tq, D]
    return out.transpose(1, 2).reshape(batch, q_len, num_heads * head_dim)


class _ExportLayers:
    """Shared per-layer pieces: qkv + rope, attention output, MLP, over [B, T, hidden] hidden states."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        self.model = model

    def qkv(self, attn: LlamaAttention, hidden: torch.Tensor,
            cos_sin: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """hidden [B, T, hidden] -> q [B, H, T, D], k and v [B, KVH, T, D] (rope applied to q, k)."""
        batch, seq_len, _ = hidden.shape
        qkv = attn.qkv_proj(hidden.reshape(batch * seq_len, -1))   # [B*T, q_size + 2 * kv_size]
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q = q.reshape(batch * seq_len, attn.num_heads, attn.head_dim)
        k = k.reshape(batch * seq_len, attn.num_kv_heads, attn.head_dim)
        q, k = attn._rope(q, k, *cos_sin)
        heads = lambda x, n: x.reshape(batch, seq_len, n, attn.head_dim).transpose(1, 2)  # noqa: E731
        return heads(q, attn.num_heads), heads(k, attn.num_kv_heads), heads(v, attn.num_kv_heads)

    def block(self, layer: LlamaDecoderLayer, hidden: torch.Tensor, attn_out: torch.Tensor
              ) -> torch.Tensor:
        """Residual + o_proj + post-attention norm + MLP + residual; all [B, T, hidden]."""
        batch, seq_len, _ = hidden.shape
        hidden = hidden + layer.self_attn.o_proj(attn_out.reshape(batch * seq_len, -1)).reshape(
            batch, seq_len, -1)
        mlp_in = export_rms_norm(layer.post_attention_layernorm, hidden)
        mlp_out = layer.mlp(mlp_in.reshape(batch * seq_len, -1)).reshape(batch, seq_len, -1)
        return hidden + mlp_out

    def rope_table(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B*T, 1, D] from the model's own cos/sin table."""
        return self.model.model.rotary_emb(positions.reshape(-1))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, hidden] (last token per row) -> fp32 logits [B, vocab]."""
        return self.model.compute_logits(export_rms_norm(self.model.model.norm, hidden))


class PrefillGraph(nn.Module):
    """One prompt (batch 1, causal): (input_ids, positions) -> (logits, present K/V per layer)."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        super().__init__()
        self.model = model
        self._layers = _ExportLayers(model)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        seq_len = input_ids.shape[1]
        idx = torch.arange(seq_len, device=input_ids.device)
        visible = (idx.unsqueeze(1) >= idx.unsqueeze(0)).reshape(1, 1, seq_len, seq_len)
        cos_sin = self._layers.rope_table(positions)
        hidden = self.model.model.embed_tokens(input_ids)            # [1, T, hidden]
        present: list[torch.Tensor] = []
        for layer in self.model.model.layers:
            attn = layer.self_attn
            q, k, v = self._layers.qkv(attn, export_rms_norm(layer.input_layernorm, hidden), cos_sin)
            out = _attend(q, k, v, visible, attn.attn.scale)
            hidden = self._layers.block(layer, hidden, out)
            present += [k, v]
        return (self._layers.logits(hidden[:, -1]), *present)


class DecodeGraph(nn.Module):
    """One new token per sequence over explicit past K/V:
    (input_ids, positions, past_lens, past K/V per layer) -> (logits, present K/V per layer)."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        super().__init__()
        self.model = model
        self._layers = _ExportLayers(model)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, past_lens: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        past_len = past[0].shape[2]
        key_idx = torch.arange(past_len + 1, device=input_ids.device)              # [P + 1]
        visible = (key_idx.unsqueeze(0) < past_lens.unsqueeze(1)) | (key_idx == past_len)
        visible = visible.unsqueeze(1).unsqueeze(1)                                  # [B, 1, 1, P + 1]
        cos_sin = self._layers.rope_table(positions)
        hidden = self.model.model.embed_tokens(input_ids)                            # [B, 1, hidden]
        present: list[torch.Tensor] = []
        for i, layer in enumerate(self.model.model.layers):
            attn = layer.self_attn
            q, k, v = self._layers.qkv(attn, export_rms_norm(layer.input_layernorm, hidden), cos_sin)
            k = torch.cat((past[2 * i], k), dim=2)                                   # [B, KVH, P + 1, D]
            v = torch.cat((past[2 * i + 1], v), dim=2)
            out = _attend(q, k, v, visible, attn.attn.scale)
            hidden = self._layers.block(layer, hidden, out)
            present += [k, v]
        return (self._layers.logits(hidden[:, -1]), *present)
