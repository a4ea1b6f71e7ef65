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


def make_tiny_model_dir(path: Path, arch: str, tie: bool = False, seed: int = 0) -> Path:
    """Save a random tiny HF model + tokenizer to `path` (fp32 safetensors)."""
    torch.manual_seed(seed)
    config, cls = tiny_config(arch, tie)
    model = cls(config).eval()
    with torch.no_grad():   # larger-than-default init so logits are far from uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif p.dim() == 1 and p.shape[0] == config.hidden_size:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0, 0.05)
    model.save_pretrained(path, safe_serialization=True)
    make_tokenizer().save_pretrained(path)
    return path
