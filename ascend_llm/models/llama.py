"""Llama family (LLaMA 2/3/3.1, SmolLM2); Qwen2 reuses it with qkv bias."""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn as nn

from ascend_llm.distributed.parallel_state import ParallelContext
from ascend_llm.layers.activation import SiluAndMul
from ascend_llm.layers.attention import Attention
from ascend_llm.layers.embedding import LMHead, VocabEmbedding
from ascend_llm.layers.layernorm import RMSNorm
from ascend_llm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from ascend_llm.layers.rotary import RotaryEmbedding, rope_parameters
from ascend_llm.models.decoder_layer import DecoderStack, PreNormDecoderLayer
from ascend_llm.models.forward_batch import ForwardBatch
from ascend_llm.models.weight_utils import load_weights_into
from ascend_llm.ops.registry import OpSet
from ascend_llm.quant.base import QuantConfig


class LlamaAttention(nn.Module):
    """Self-attention: fused qkv projection, rotary, paged attention, output projection."""

    def __init__(self, config: Any, ops: OpSet, quant_config: QuantConfig | None, prefix: str,
                 dtype: torch.dtype, biases: tuple[bool, bool], parallel: ParallelContext) -> None:
        super().__init__()
        qkv_bias, o_bias = biases
        total_heads, total_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // total_heads
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, total_heads,
                                          total_kv_heads, qkv_bias, dtype, quant_config,
                                          f"{prefix}.qkv_proj", ops=ops, parallel=parallel)
        self.o_proj = RowParallelLinear(total_heads * self.head_dim, config.hidden_size, o_bias, dtype,
                                        quant_config, f"{prefix}.o_proj", ops=ops, parallel=parallel)
        # this rank's heads; KV heads are replicated when fewer than ranks
        self.num_heads = total_heads // parallel.world_size
        self.num_kv_heads = self.qkv_proj.output_sizes[1] // self.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self._rope = ops.get("rope")
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads,
                              self.head_dim ** -0.5, ops)

    def forward(self, cos_sin: tuple[torch.Tensor, torch.Tensor], hidden: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], batch: ForwardBatch) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden)                      # [T, q_size + 2 * kv_size]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = self._rope(q, k, *cos_sin)
        out = self.attn(q, k, v, kv_cache, batch.attn_metadata)
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    """SwiGLU MLP with fused gate/up projection."""

    def __init__(self, config: Any, ops: OpSet, quant_config: QuantConfig | None, prefix: str,
                 dtype: torch.dtype, parallel: ParallelContext) -> None:
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [config.intermediate_size] * 2, bias, dtype, quant_config,
            f"{prefix}.gate_up_proj", ops=ops, parallel=parallel)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias,
                                           dtype, quant_config, f"{prefix}.down_proj", ops=ops,
                                           parallel=parallel)
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act: {config.hidden_act!r} is not supported (silu only)")
        self.act_fn = SiluAndMul(ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(PreNormDecoderLayer):
    """Pre-norm block; the residual travels alongside so norms can fuse the add."""

    def __init__(self, config: Any, ops: OpSet, quant_config: QuantConfig | None, prefix: str,
                 dtype: torch.dtype, biases: tuple[bool, bool], parallel: ParallelContext) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, ops, quant_config, f"{prefix}.self_attn", dtype, biases,
                                        parallel)
        self.mlp = LlamaMLP(config, ops, quant_config, f"{prefix}.mlp", dtype, parallel)
        norm_bias = getattr(quant_config, "norm_has_bias", lambda prefix: False)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops, dtype,
                                       norm_bias(f"{prefix}.input_layernorm"))
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops, dtype,
                                                norm_bias(f"{prefix}.post_attention_layernorm"))


class LlamaModel(DecoderStack):
    """Embedding, decoder layers and final norm."""

    def __init__(self, config: Any, ops: OpSet, quant_config: QuantConfig | None,
                 dtype: torch.dtype, biases: tuple[bool, bool], parallel: ParallelContext) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, dtype, parallel, ops)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, ops, quant_config, f"model.layers.{i}", dtype, biases, parallel)
            for i in range(config.num_hidden_layers))
        norm_bias = getattr(quant_config, "norm_has_bias", lambda prefix: False)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops, dtype, norm_bias("model.norm"))
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.rotary_emb = RotaryEmbedding(head_dim, config.max_position_embeddings, rope_parameters(config))


class LlamaForCausalLM(nn.Module):
    """Causal LM: forward(batch) -> hidden [T, hidden]; compute_logits(hidden) -> [N, vocab]."""

    supports_tensor_parallel = True     # takes `parallel` (column/row-parallel layers, vocab shards)
    # checkpoint name -> (fused parameter name, shard id)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    @staticmethod
    def attention_biases(config: Any) -> tuple[bool, bool]:
        """(qkv bias, o_proj bias): Llama's `attention_bias` covers all four projections."""
        bias = bool(getattr(config, "attention_bias", False))
        return bias, bias

    def __init__(self, config: Any, ops: OpSet, quant_config: QuantConfig | None = None,
                 dtype: torch.dtype = torch.float32, parallel: ParallelContext | None = None) -> None:
        super().__init__()
        self.config = config
        self.parallel = parallel or ParallelContext()     # tensor-parallel rank and group
        self.model = LlamaModel(config, ops, quant_config, dtype, self.attention_biases(config),
                                self.parallel)
        tied = self.model.embed_tokens if getattr(config, "tie_word_embeddings", False) else None
        self.lm_head = LMHead(config.vocab_size, config.hidden_size, dtype, tied, ops, self.parallel)

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        return self.model(batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors into parameters; returns the names that were loaded."""
        return load_weights_into(self, weights, self.packed_modules_mapping)
