"""`--quantization` names -> QuantConfig. Unknown names fail with the list of known ones.

Pre-quantized checkpoints are recognised without a name: msModelSlim description files, and a
config.json `quantization_config` whose method (`quant_method`, or FastDeploy's `quantization`)
is one of CHECKPOINT_METHODS (FastDeploy's `block_wise_fp8` included: quant/block_wise_fp8_checkpoint.py).
Passing the checkpoint's own method name (or `block_wise_fp8` for a DeepSeek block-FP8 checkpoint)
loads it as is; any other online method on a quantized checkpoint is an error.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ascend_llm.quant.base import QuantConfig
from ascend_llm.quant.block_wise_fp8_checkpoint import block_wise_fp8_from_checkpoint
from ascend_llm.quant.compressed_tensors import CompressedTensorsConfig
from ascend_llm.quant.formats import checkpoint_model_format, config_quant_method, detect_quant_format
from ascend_llm.quant.fp8 import BlockWiseFp8Config, Fp8Config
from ascend_llm.quant.fp8_checkpoint import Fp8CheckpointConfig
from ascend_llm.quant.w8a8 import DEFAULT_PACKED_MODULES, AscendW8A8Config
from ascend_llm.quant.weight_only import WInt4Config, WInt8Config, weight_only_config_from_checkpoint
from ascend_llm.quant.wint2 import WRITER_HINT, WInt2Config

# Online methods: quantize a float checkpoint at load time.
_ONLINE_METHODS: dict[str, Callable[[], QuantConfig]] = {
    "wint8": WInt8Config,
    "wint4": WInt4Config,
    "fp8": Fp8Config,
    "block_wise_fp8": BlockWiseFp8Config,
}
# msModelSlim checkpoints (quant_model_description*.json); detected without a name too.
ASCEND_NAMES = ("ascend", "w8a8", "w8a8_dynamic")
# Offline-only formats: a checkpoint in that format is required.
OFFLINE_METHODS = ("wint2",)
# config.json quantization_config methods this build loads.
CHECKPOINT_METHODS = ("fp8", "wint2", "wint8", "wint4", "compressed-tensors", "block_wise_fp8")
# Checkpoint formats that can also be named (vLLM's `--quantization compressed-tensors`).
CHECKPOINT_ONLY_METHODS = ("compressed-tensors",)
PLANNED_METHODS = tuple(_ONLINE_METHODS) + ASCEND_NAMES + OFFLINE_METHODS + CHECKPOINT_ONLY_METHODS


def available_methods() -> tuple[str, ...]:
    """The `--quantization` names this build can run."""
    return PLANNED_METHODS


def get_quant_config(name: str | None, hf_config: object | None = None,
                     model_dir: str | Path | None = None,
                     packed_modules: Mapping[str, Sequence[str]] | None = None) -> QuantConfig | None:
    """The QuantConfig for `name` (case-insensitive; None / "none" = whatever the checkpoint is).

    `model_dir` lets checkpoint formats be detected (msModelSlim's description file, config.json
    `quantization_config`); `packed_modules` maps fused layer names to their checkpoint shards
    (qkv_proj -> q/k/v_proj).
    """
    detected = detect_quant_format(model_dir) if model_dir is not None else None
    is_ascend = detected is not None and detected["format"] == "ascend"
    checkpoint = None if is_ascend else _checkpoint_quant(detected, hf_config)
    packed = {k: tuple(v) for k, v in (packed_modules or DEFAULT_PACKED_MODULES).items()}
    key = (name or "none").lower()
    if key in ("none", ""):
        if is_ascend:
            return AscendW8A8Config.from_model_dir(model_dir, packed_modules)
        return _from_checkpoint(checkpoint, packed, hf_config) if checkpoint else None
    if key in ASCEND_NAMES:
        if not is_ascend:
            raise ValueError(f"quantization: {name!r} needs an msModelSlim checkpoint with a "
                             f"quant_model_description*.json; none found in {model_dir}")
        return AscendW8A8Config.from_model_dir(model_dir, packed_modules)
    if key in CHECKPOINT_ONLY_METHODS:
        if checkpoint is None or checkpoint["method"] != key:
            found = "none" if checkpoint is None else repr(checkpoint["method"])
            raise ValueError(f"quantization: {name!r} needs a checkpoint in that format (config.json "
                             f"quantization_config quant_method {key!r}); {model_dir or 'this model'} "
                             f"has {found}")
        return _from_checkpoint(checkpoint, packed, hf_config)
    if key not in _ONLINE_METHODS and key not in OFFLINE_METHODS:
        raise ValueError(f"quantization: unknown method {name!r}; known methods: {', '.join(PLANNED_METHODS)}")
    if is_ascend:
        raise ValueError(f"quantization: {name!r} quantizes a float checkpoint, but {model_dir} is "
                         "an msModelSlim quantized checkpoint; drop --quantization to load it as is")
    if checkpoint is not None:
        if not _compatible(key, checkpoint):
            raise ValueError(f"quantization: {checkpoint['source']} is already quantized "
                             f"(quantization_config method {checkpoint['method']!r}); loading it as "
                             f"{name!r} is not possible; drop --quantization to load it as is")
        return _from_checkpoint(checkpoint, packed, hf_config)
    if key in OFFLINE_METHODS:
        raise ValueError(f"quantization: {name!r} needs a checkpoint in that format and "
                         f"{model_dir or 'this model'} has none. {WRITER_HINT}")
    return _ONLINE_METHODS[key]()


def _checkpoint_quant(detected: dict[str, Any] | None, hf_config: Any) -> dict[str, Any] | None:
    """{method, config, source} of the checkpoint's quantization_config (config.json first)."""
    if detected is not None:
        return {"method": detected["format"], "config": detected["config"], "source": detected["path"]}
    quant = getattr(hf_config, "quantization_config", None) if hf_config is not None else None
    if not quant:
        return None
    if not isinstance(quant, dict):
        quant = quant.to_dict() if hasattr(quant, "to_dict") else vars(quant)
    source = "config.json"
    return {"method": config_quant_method(quant, source), "config": quant, "source": source}


def _compatible(key: str, checkpoint: dict[str, Any]) -> bool:
    method = checkpoint["method"]
    if key == method:
        return True
    return key == "block_wise_fp8" and method == "fp8" and "weight_block_size" in checkpoint["config"]


def _from_checkpoint(checkpoint: dict[str, Any], packed: dict[str, tuple[str, ...]],
                     hf_config: object | None = None) -> QuantConfig:
    method, config, source = checkpoint["method"], checkpoint["config"], checkpoint["source"]
    if method == "fp8":
        return Fp8CheckpointConfig.from_config(config, packed, source)
    if method == "block_wise_fp8":
        return block_wise_fp8_from_checkpoint(config, packed, source, _model_format(source))
    if method == "wint2":
        wint2 = WInt2Config.from_config(config, packed, source)
        num_layers = getattr(hf_config, "num_hidden_layers", None)
        if isinstance(num_layers, int):
            wint2.check_layer_coverage(num_layers, source)
        return wint2
    if method in ("wint8", "wint4"):
        return weight_only_config_from_checkpoint(config, packed, source)
    if method == "compressed-tensors":
        return CompressedTensorsConfig.from_config(config, packed, source)
    raise ValueError(f"{source}: quantization_config method {method!r} is not supported; supported "
                     f"quant_method values: {', '.join(CHECKPOINT_METHODS)} (and msModelSlim "
                     f"checkpoints with a quant_model_description*.json)")


def _model_format(source: str) -> str:
    """FastDeploy's "paddle" / "torch" checkpoint format of the config.json at `source` ("torch"
    when only a config object was given)."""
    path = Path(source)
    return checkpoint_model_format(path.parent) if path.name == "config.json" and path.is_file() else "torch"
