"""`--quantization` names -> QuantConfig. Unknown names fail with the list of known ones."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ascend_llm.quant.base import QuantConfig
from ascend_llm.quant.formats import detect_quant_format
from ascend_llm.quant.fp8 import BlockWiseFp8Config, Fp8Config
from ascend_llm.quant.w8a8 import AscendW8A8Config
from ascend_llm.quant.weight_only import WInt4Config, WInt8Config

# Online methods: quantize a float checkpoint at load time.
_ONLINE_METHODS: dict[str, Callable[[], QuantConfig]] = {
    "wint8": WInt8Config,
    "wint4": WInt4Config,
    "fp8": Fp8Config,
    "block_wise_fp8": BlockWiseFp8Config,
}
# msModelSlim checkpoints (quant_model_description*.json); detected without a name too.
ASCEND_NAMES = ("ascend", "w8a8", "w8a8_dynamic")
# Names users type (vLLM / FastDeploy / msModelSlim) that are recognised but not wired in yet.
NOT_YET_IMPLEMENTED = ("wint2",)
PLANNED_METHODS = tuple(_ONLINE_METHODS) + ASCEND_NAMES + NOT_YET_IMPLEMENTED


def available_methods() -> tuple[str, ...]:
    """The `--quantization` names this build can run."""
    return tuple(_ONLINE_METHODS) + ASCEND_NAMES


def get_quant_config(name: str | None, hf_config: object | None = None,
                     model_dir: str | Path | None = None,
                     packed_modules: Mapping[str, Sequence[str]] | None = None) -> QuantConfig | None:
    """The QuantConfig for `name` (case-insensitive; None / "none" = whatever the checkpoint is).

    `model_dir` lets checkpoint formats be detected (msModelSlim's description file);
    `packed_modules` maps fused layer names to their checkpoint shards (qkv_proj -> q/k/v_proj).
    """
    detected = detect_quant_format(model_dir) if model_dir is not None else None
    is_ascend = detected is not None and detected["format"] == "ascend"
    key = (name or "none").lower()
    if key in ("none", ""):
        if is_ascend:
            return AscendW8A8Config.from_model_dir(model_dir, packed_modules)
        _reject_prequantized("float", hf_config)
        return None
    if key in ASCEND_NAMES:
        if not is_ascend:
            raise ValueError(f"quantization: {name!r} needs an msModelSlim checkpoint with a "
                             f"quant_model_description*.json; none found in {model_dir}")
        return AscendW8A8Config.from_model_dir(model_dir, packed_modules)
    if key in _ONLINE_METHODS:
        if is_ascend:
            raise ValueError(f"quantization: {name!r} quantizes a float checkpoint, but {model_dir} is "
                             "an msModelSlim quantized checkpoint; drop --quantization to load it as is")
        _reject_prequantized(name, hf_config)
        return _ONLINE_METHODS[key]()
    if key in NOT_YET_IMPLEMENTED:
        raise ValueError(f"quantization: {name!r} is recognised but not implemented in this build yet; "
                         f"available: {', '.join(available_methods())}")
    raise ValueError(f"quantization: unknown method {name!r}; known methods: {', '.join(PLANNED_METHODS)}")


def _reject_prequantized(name: str, hf_config: Any) -> None:
    """Online methods need a float checkpoint; a config.json `quantization_config` means it is not."""
    qc = getattr(hf_config, "quantization_config", None) if hf_config is not None else None
    if qc:
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
        raise ValueError(f"quantization: this checkpoint's config.json has a quantization_config "
                         f"(quant_method={method!r}); loading it as {name!r} is not supported yet")
