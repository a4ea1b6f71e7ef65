"""Model loading: resolve a model argument to a local HF directory, then read its config, tokenizer and weights."""
from ascend_llm.loader.gguf_convert import convert_gguf_to_hf
from ascend_llm.loader.hf_config import load_hf_config, load_tokenizer
from ascend_llm.loader.resolve import DEFAULT_MODEL, KNOWN_ALIASES, resolve_model_path
from ascend_llm.loader.weights import iter_safetensors_weights

__all__ = [
    "DEFAULT_MODEL",
    "KNOWN_ALIASES",
    "convert_gguf_to_hf",
    "iter_safetensors_weights",
    "load_hf_config",
    "load_tokenizer",
    "resolve_model_path",
]
