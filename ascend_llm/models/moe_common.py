"""Pieces shared by the MoE decoder models (ERNIE-4.5-MoE, Qwen2-MoE, Qwen3-MoE).

Each decoder layer is attention + either a dense SwiGLU MLP or a sparse MoE block; the model
decides which per layer index, and builds the attention and MoE block it needs.

Tensor parallelism (a `ParallelContext` of more than one rank), as llama.py and vLLM: attention
heads split (KV heads replicated when fewer than ranks), dense MLPs column/row-parallel, vocab-
parallel embedding and LM head, the router gate replicated. A sparse block's routed experts
(FusedMoE, moe intermediate dim split) and its shared experts (row-parallel down projection
built with `reduce_results=False`) each leave this rank's partial sum; the block adds them and
all-reduces once (`PartialSumReducer`).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from ascend_llm.distributed.parallel_state import ParallelContext
from ascend_llm.layers.activation import SiluAndMul
from ascend_llm.layers.attention import Attention
from ascend_llm.layers.embedding import LMHead, VocabEmbedding
from ascend_llm.layers.layernorm import RMSNorm
from ascend_llm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from ascend_llm.layers.moe import expert_loader
from ascend_llm.layers.rotary import RotaryEmbedding, rope_parameters
from ascend_llm.models.decoder_layer import DecoderStack, PreNormDecoderLayer
from ascend_llm.models.forward_batch import ForwardBatch
from ascend_llm.models.weight_utils import load_weights_into
from ascend_llm.ops.registry import OpSet
from ascend_llm.quant.base import QuantConfig

# (layer index, prefix) -> module
ModuleFactory = Callable[[int, str], nn.Module]


def check_silu(config: Any) -> None:
    """ValueError unless the model's activation is SiLU (SwiGLU experts)."""
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act: {act!r} is not supported (silu only)")


class PartialSumReducer:
    """Sums this rank's partial [T, H] output over the tensor-parallel group (identity on one rank)."""

    def __init__(self, ops: OpSet, parallel: ParallelContext) -> None:
        self.parallel = parallel
        self._all_reduce = ops.get("all_reduce") if parallel.is_distributed else None

    def __call__(self, partial: torch.Tensor) -> torch.Tensor:
        if self._all_reduce is None:
            return partial
        return self._all_reduce(partial, self.parallel)


class PartialRowParallelLinear(RowParallelLinear):
    """Row-parallel linear that returns this rank's partial sum (vLLM's reduce_results=False):
    the caller adds it to other partial sums and all-reduces once. The bias, if any, is added
    on rank 0 only, as RowParallelLinear does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if self.tp_rank == 0 else None
        return self.apply_method(x, bias)                         # [T, n] partial sum


class MoEAttention(nn.Module):
    """Self-attention: fused qkv, optional per-head q/k RMSNorm (Qwen3), rotary (neox, or GPT-J
    interleaved pairs as ERNIE uses), paged attention, output projection.

    Interleaved rotary = the neox rotation of q and k with each head's dims reordered (even dims
    first, then odd): q.k is unchanged by a common reorder, so the head dims are permuted once
    here and the backend's neox `rope` op runs as usual (the KV cache holds permuted keys).
    """

    def __init__(self, config: Any, ops: OpSet, quant_config: QuantConfig | None, prefix: str,
                 dtype: torch.dtype, biases: tuple[bool, bool], parallel: ParallelContext,
                 qk_norm: bool = False, interleaved_rope: bool = False) -> None:
        super().__init__()
        total_heads, total_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // total_heads
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, total_heads,
                                          total_kv_heads, biases[0], dtype, quant_config,
                                          f"{prefix}.qkv_proj", ops=ops, parallel=parallel)
        self.o_proj = RowParallelLinear(total_heads * self.head_dim, config.hidden_size, biases[1], dtype,
                                        quant_config, f"{prefix}.o_proj", ops=ops, parallel=parallel)
        # this rank's heads; KV heads are replicated when fewer than ranks
        self.num_heads = total_heads // parallel.world_size
        self.num_kv_heads = self.qkv_proj.output_sizes[1] // self.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, ops, dtype) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, ops, dtype) if qk_norm else None
        perm = torch.cat([torch.arange(0, self.head_dim, 2), torch.arange(1, self.head_dim, 2)])
        self.register_buffer("rope_perm", perm if interleaved_rope else None, persistent=False)
        self._rope = ops.get("rope")
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads, self.head_dim ** -0.5, ops)

    def forward(self, cos_sin: tuple[torch.Tensor, torch.Tensor], hidden: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], batch: ForwardBatch) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q.reshape(-1, self.head_dim)).view_as(q)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view_as(k)
        if self.rope_perm is not None:
            q, k = q.index_select(-1, self.rope_perm), k.index_select(-1, self.rope_perm)
        q, k = self._rope(q, k, *cos_sin)
        return self.o_proj(self.attn(q, k, v, kv_cache, batch.attn_metadata))


class DenseMLP(nn.Module):
    """SwiGLU MLP (dense layers and shared experts): fused gate/up (column-parallel), then down
    (row-parallel). With `reduce_results=False` the output is this rank's partial sum (shared
    experts: the MoE block all-reduces it together with the routed experts' partial sum)."""

    def __init__(self, hidden_size: int, intermediate_size: int, ops: OpSet,
                 quant_config: QuantConfig | None, prefix: str, dtype: torch.dtype,
                 parallel: ParallelContext, bias: bool = False, reduce_results: bool = True) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, bias, dtype,
                                                       quant_config, f"{prefix}.gate_up_proj", ops=ops,
                                                       parallel=parallel)
        down_cls = RowParallelLinear if reduce_results else PartialRowParallelLinear
        self.down_proj = down_cls(intermediate_size, hidden_size, bias, dtype, quant_config,
                                  f"{prefix}.down_proj", ops=ops, parallel=parallel)
        self.act_fn = SiluAndMul(ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class MoEDecoderLayer(PreNormDecoderLayer):
    """Pre-norm block: attention, then the (dense or sparse) MLP; residual carried alongside."""

    def __init__(self, config: Any, ops: OpSet, dtype: torch.dtype, self_attn: nn.Module,
                 mlp: nn.Module) -> None:
        super().__init__()
        self.self_attn, self.mlp = self_attn, mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops, dtype)


class MoEModel(DecoderStack):
    """Embedding, decoder layers (attention / mlp from the factories) and final norm."""

    def __init__(self, config: Any, ops: OpSet, dtype: torch.dtype, make_attn: ModuleFactory,
                 make_mlp: ModuleFactory, parallel: ParallelContext) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, dtype, parallel, ops)
        self.layers = nn.ModuleList(
            MoEDecoderLayer(config, ops, dtype, make_attn(i, f"model.layers.{i}.self_attn"),
                            make_mlp(i, f"model.layers.{i}.mlp"))
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops, dtype)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.rotary_emb = RotaryEmbedding(head_dim, config.max_position_embeddings, rope_parameters(config))


class MoEForCausalLM(nn.Module):
    """Causal LM base: subclasses build `self.model` (a MoEModel); logits through the LM head."""

    supports_tensor_parallel = True     # takes `parallel` (see the module doc)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: Any, ops: OpSet, dtype: torch.dtype, model: MoEModel,
                 parallel: ParallelContext) -> None:
        super().__init__()
        check_silu(config)
        self.config = config
        self.parallel = parallel
        self.model = model
        tied = self.model.embed_tokens if getattr(config, "tie_word_embeddings", False) else None
        self.lm_head = LMHead(config.vocab_size, config.hidden_size, dtype, tied, ops, parallel)

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        return self.model(batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors into parameters (experts stacked per layer); returns the names."""
        return load_weights_into(self, weights, self.packed_modules_mapping, expert_loader(self))
