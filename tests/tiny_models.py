"""Tiny random-weight HF models (transformers' own classes) with a small trained BPE tokenizer."""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Full fathom five thy father lies; of his bones are coral made.",
    "We are such stuff as dreams are made on, and our little life is rounded with a sleep.",
    "Tensor parallel inference on Ascend NPUs with paged attention and continuous batching.",
] * 4
_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                  "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
VOCAB_SIZE = 384


def make_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                   unk_token="<|endoftext|>", chat_template=_CHAT_TEMPLATE)


def tiny_config(arch: str, tie: bool = False, vocab_size: int = VOCAB_SIZE):
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-6, tie_word_embeddings=tie, eos_token_id=2, bos_token_id=1)
    if arch == "llama":
        return LlamaConfig(**common, rope_theta=10000.0), LlamaForCausalLM
    if arch == "qwen2":
        return Qwen2Config(**common, rope_theta=1000000.0), Qwen2ForCausalLM
    raise ValueError(arch)


def init_tiny_weights(model: torch.nn.Module, hidden_size: int) -> None:
    """A larger-than-default init so logits are far from uniform: matrices N(0, 0.08), norm
    weights U(0.8, 1.2), other vectors N(0, 0.05)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif p.dim() == 1 and p.shape[0] == hidden_size:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0, 0.05)


def make_tiny_model_dir(path: Path, arch: str, tie: bool = False, seed: int = 0) -> Path:
    """Save a random tiny HF model + tokenizer to `path` (fp32 safetensors)."""
    torch.manual_seed(seed)
    config, cls = tiny_config(arch, tie)
    model = cls(config).eval()
    init_tiny_weights(model, config.hidden_size)
    model.save_pretrained(path, safe_serialization=True)
    make_tokenizer().save_pretrained(path)
    return path


# ---------------------------------------------------------------- tiny MoE models (issue 9)

def tiny_moe_config(arch: str, vocab_size: int = VOCAB_SIZE, num_layers: int = 3, **overrides):
    """(config, HF class) of a tiny MoE: 8 experts, top-2, moe_intermediate 32 (first layer dense);
    `overrides` replace config fields (e.g. moe_intermediate_size)."""
    from transformers import (Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM, Qwen2MoeConfig,
                              Qwen2MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=num_layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-6, eos_token_id=2, bos_token_id=1, pad_token_id=0)
    if arch == "ernie4_5_moe":
        ernie = dict(common, tie_word_embeddings=True, moe_intermediate_size=32, moe_k=2,
                     moe_num_experts=8, moe_num_shared_experts=2, moe_layer_start_index=1,
                     moe_layer_interval=1, use_bias=False)
        return Ernie4_5_MoeConfig(**{**ernie, **overrides}), Ernie4_5_MoeForCausalLM
    qwen = dict(common, tie_word_embeddings=False, moe_intermediate_size=32, num_experts=8,
                num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[0])
    if arch == "qwen2_moe":
        qwen2 = dict(qwen, shared_expert_intermediate_size=48, norm_topk_prob=False, rope_theta=1000000.0)
        return Qwen2MoeConfig(**{**qwen2, **overrides}), Qwen2MoeForCausalLM
    if arch == "qwen3_moe":
        qwen3 = dict(qwen, norm_topk_prob=True, head_dim=16, rope_theta=1000000.0)
        return Qwen3MoeConfig(**{**qwen3, **overrides}), Qwen3MoeForCausalLM
    raise ValueError(arch)


def make_tiny_moe_model_dir(path: Path, arch: str, seed: int = 0, num_layers: int = 3,
                            **overrides) -> Path:
    """Save a random tiny HF MoE model + tokenizer to `path` (fp32 safetensors, per-expert tensors).

    Router weights are drawn larger than the rest so top-k choices are well separated, and
    ERNIE's e_score_correction_bias is non-zero (it changes which experts win).
    """
    torch.manual_seed(seed)
    config, cls = tiny_moe_config(arch, num_layers=num_layers, **overrides)
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)
            elif "e_score_correction_bias" in name:
                p.uniform_(-0.1, 0.1)
            elif p.dim() >= 2:
                p.normal_(0, 0.08)
            elif p.dim() == 1 and p.shape[0] in (config.hidden_size, getattr(config, "head_dim", -1)):
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0, 0.05)
    model.save_pretrained(path, safe_serialization=True)
    make_tokenizer().save_pretrained(path)
    return path
