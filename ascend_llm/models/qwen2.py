"""Qwen2 / Qwen2.5: the Llama architecture with bias on q, k and v (not on o_proj)."""
from __future__ import annotations

from typing import Any

from ascend_llm.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 causal LM (tied or untied embeddings, per `tie_word_embeddings`)."""

    @staticmethod
    def attention_biases(config: Any) -> tuple[bool, bool]:
        return True, False

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        if getattr(config, "use_sliding_window", False):
            raise ValueError("use_sliding_window: sliding-window attention is not supported yet")
        super().__init__(config, *args, **kwargs)
