"""`--quantization` names -> QuantConfig. Unknown names fail with the list of known ones."""
from __future__ import annotations

from ascend_llm.quant.base import QuantConfig

# Names users type (vLLM / FastDeploy / msModelSlim); methods register as they land.
PLANNED_METHODS = ("ascend", "w8a8", "w8a8_dynamic", "wint8", "wint4", "wint2",
                   "block_wise_fp8", "fp8")


def get_quant_config(name: str | None, hf_config: object | None = None) -> QuantConfig | None:
    """The QuantConfig for `name` (None = float model)."""
    if name is None or name in ("none", "None", ""):
        return None
    key = name.lower()
    if key in PLANNED_METHODS:
        raise ValueError(f"quantization: {name!r} is recognised but not implemented in this build yet")
    raise ValueError(f"quantization: unknown method {name!r}; known methods: {', '.join(PLANNED_METHODS)}")
