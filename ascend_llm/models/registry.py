"""HF architecture name -> model class."""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from ascend_llm.models.ernie4_5_moe import Ernie4_5_MoeForCausalLM
from ascend_llm.models.llama import LlamaForCausalLM
from ascend_llm.models.qwen2 import Qwen2ForCausalLM
from ascend_llm.models.qwen2_moe import Qwen2MoeForCausalLM
from ascend_llm.models.qwen3_moe import Qwen3MoeForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Ernie4_5_MoeForCausalLM": Ernie4_5_MoeForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
}


def get_model_class(hf_config: Any) -> type[nn.Module]:
    """The class for the config's `architectures`; ValueError naming them if unsupported."""
    architectures = list(getattr(hf_config, "architectures", None) or [])
    for arch in architectures:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ValueError(f"unsupported architecture {architectures or '(none in config.json)'}; "
                     f"supported: {', '.join(sorted(MODEL_REGISTRY))}")
