"""ascend-llm: an Ascend-NPU-first LLM inference runtime with CUDA and CPU fallbacks."""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "EngineArgs", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy so that `import ascend_llm.<sub>` stays cheap (no torch/transformers import).
    if name == "LLM":
        from ascend_llm.llm import LLM
        return LLM
    if name == "SamplingParams":
        from ascend_llm.sampling_params import SamplingParams
        return SamplingParams
    if name in ("RequestOutput", "CompletionOutput"):
        from ascend_llm import outputs
        return getattr(outputs, name)
    if name == "EngineArgs":
        from ascend_llm.engine.arg_utils import EngineArgs
        return EngineArgs
    raise AttributeError(f"module 'ascend_llm' has no attribute {name!r}")
