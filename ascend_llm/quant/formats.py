"""Detect a checkpoint's quantization format (msModelSlim description files, `quantization_config`).

msModelSlim (ascendV1) writes `quant_model_description.json`; its `--mindie_format` path writes
`quant_model_description_<type>.json` (e.g. `_w8a8`) and adds a `quantization_config` without
`quant_method` to config.json. A description file wins over config.json, as in vllm-ascend.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ascend_llm.numerics.hadamard import is_power_of_two

DESCRIPTION_FILE = "quant_model_description.json"
DESCRIPTION_GLOB = "quant_model_description_*.json"

# Every type string msModelSlim writes (model-level or per tensor); see the format reference §1-2.
KNOWN_QUANT_TYPES = frozenset({
    "FLOAT", "W16A16S", "W8A16", "W8A8_DYNAMIC", "W8A8_MIX", "W8A8", "W8A8S", "W8A8SC",
    "W4A16", "W4A8_DYNAMIC", "W4A4_DYNAMIC", "W4A4_FLATQUANT_DYNAMIC", "W8A8_MXFP8",
    "W4A8_MXFP", "W4A4_MXFP4", "WFP8AFP8_DYNAMIC", "W8A8FP8_DYNAMIC", "C8", "FAQuant", "FAKQuant", "INT8_DYNAMIC",
})
# Our key (not msModelSlim's): {"block_size": b, "layers": [Linear names]}, the Linears whose weight
# holds a folded block-diagonal Hadamard rotation (W @ blockdiag(H_b)), so the runtime rotates their
# input online (QuaRot's R4 before down_proj). vllm-ascend / MindIE do not read it.
ONLINE_HADAMARD_KEY = "online_hadamard"
_NOT_LINEAR_LEAVES = ("lm_head", "embed_tokens")
# Top-level description keys that are not tensor names.
DESCRIPTION_META_KEYS = frozenset({
    "model_quant_type", "version", "group_size", "metadata", "optional", "kv_cache_type",
    "kv_quant_type", "fa_quant_type", "reduce_quant_type", ONLINE_HADAMARD_KEY,
})


# Older msModelSlim savers (the classic `safe_tensor` / MindIE save after an anti-outlier run) also
# write each smoothed norm as `<norm>.module.weight` / `<norm>.module.bias`, typed "W8A8" in the
# description: copies of `<norm>.weight` / `<norm>.bias` left by its norm wrapper (format
# reference §1). They are aliases, not quantized layers.
_NORM_MODULE_ALIAS = re.compile(r"^(?P<norm>.*norm)\.module\.(?P<leaf>weight|bias)$")


def norm_module_alias(name: str) -> str | None:
    """`X.weight` / `X.bias` for an msModelSlim norm alias `X.module.weight` / `X.module.bias`
    (X a `*norm` module), else None."""
    match = _NORM_MODULE_ALIAS.match(name)
    return None if match is None else f"{match['norm']}.{match['leaf']}"


def detect_quant_format(model_dir: str | Path) -> dict[str, Any] | None:
    """The quantization format of `model_dir`, or None for a float checkpoint.

    Returns `{"format": "ascend", "path", "model_quant_type", "description"}` for msModelSlim
    checkpoints, or `{"format": <quant_method>, "path", "config"}` for a `quantization_config`
    in config.json. Raises ValueError for malformed files and unknown quant types.
    """
    directory = Path(model_dir)
    description_path = _find_description(directory)
    if description_path is not None:
        description = load_description(description_path)
        return {"format": "ascend", "path": str(description_path),
                "model_quant_type": description["model_quant_type"], "description": description}
    return _config_json_format(directory)


def load_description(path: str | Path) -> dict[str, Any]:
    """Read and validate one msModelSlim description file (flat dict: tensor name -> type)."""
    path = Path(path)
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable quant description: {exc}") from exc
    validate_description(description, str(path))
    return description


def validate_description(description: Any, source: str) -> None:
    """ValueError naming `source` and the key unless `description` is a well-formed description."""
    if not isinstance(description, dict):
        raise ValueError(f"{source}: quant description must be a JSON object, "
                         f"got {type(description).__name__}")
    model_type = description.get("model_quant_type")
    if not isinstance(model_type, str):
        raise ValueError(f"{source}: missing or non-string 'model_quant_type'")
    if model_type not in KNOWN_QUANT_TYPES:
        raise ValueError(f"{source}: unknown model_quant_type {model_type!r}; "
                         f"known: {', '.join(sorted(KNOWN_QUANT_TYPES))}")
    group_size = description.get("group_size", 0)
    if not isinstance(group_size, int) or group_size < 0:
        raise ValueError(f"{source}: group_size must be a non-negative integer, got {group_size!r}")
    tensors = {k: v for k, v in description.items() if k not in DESCRIPTION_META_KEYS}
    if not tensors:
        raise ValueError(f"{source}: quant description lists no tensors")
    for name, quant_type in tensors.items():
        if not isinstance(quant_type, str) or quant_type not in KNOWN_QUANT_TYPES:
            raise ValueError(f"{source}: tensor {name!r} has unknown quant type {quant_type!r}")
    validate_online_hadamard(description, source)


def validate_online_hadamard(description: dict[str, Any], source: str) -> None:
    """ValueError naming `source`, the `online_hadamard` key and what is wrong with it, unless it is
    absent or {"block_size": a power of two >= 2, "layers": [Linear names the description lists]}."""
    if ONLINE_HADAMARD_KEY not in description:
        return
    spec, where = description[ONLINE_HADAMARD_KEY], f"{source}: '{ONLINE_HADAMARD_KEY}'"
    if not isinstance(spec, dict):
        raise ValueError(f"{where} must be an object {{\"block_size\": int, \"layers\": [...]}}, "
                         f"got {type(spec).__name__}")
    unknown = sorted(set(spec) - {"block_size", "layers"})
    if unknown or "block_size" not in spec or "layers" not in spec:
        raise ValueError(f"{where} must have exactly the keys 'block_size' and 'layers'; got {sorted(spec)}")
    block = spec["block_size"]
    if not is_power_of_two(block):
        raise ValueError(f"{where}.block_size must be a power of two >= 2, got {block!r}")
    layers = spec["layers"]
    if not isinstance(layers, list) or not layers or not all(isinstance(n, str) and n for n in layers):
        raise ValueError(f"{where}.layers must be a non-empty list of layer names, got {layers!r}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"{where}.layers lists a layer twice: {sorted({n for n in layers if layers.count(n) > 1})}")
    for name in layers:
        leaf = name.rpartition(".")[2]
        if leaf in _NOT_LINEAR_LEAVES or leaf.endswith("norm"):
            raise ValueError(f"{where}.layers: {name!r} is not a decoder Linear layer (only those take "
                             f"an online rotation)")
        if f"{name}.weight" not in description:
            raise ValueError(f"{where}.layers: {name!r} is not a layer of this checkpoint (the "
                             f"description lists no {name + '.weight'!r})")


def _find_description(directory: Path) -> Path | None:
    """`quant_model_description.json`, else the single (or config-`quantize`-named) variant."""
    main = directory / DESCRIPTION_FILE
    if main.is_file():
        return main
    variants = sorted(p for p in directory.glob(DESCRIPTION_GLOB) if p.is_file())
    if len(variants) <= 1:
        return variants[0] if variants else None
    quantize = _read_config(directory).get("quantize")
    if isinstance(quantize, str):
        named = directory / f"quant_model_description_{quantize}.json"
        if named.is_file():
            return named
    raise ValueError(f"{directory}: several quant descriptions "
                     f"({', '.join(p.name for p in variants)}) and no config.json 'quantize' "
                     f"naming one of them")


def _config_json_format(directory: Path) -> dict[str, Any] | None:
    """The `quantization_config` of config.json (top level or under text_config), if any.

    The method name is `quant_method` (HF / vLLM: "fp8", ...) or FastDeploy's `quantization`
    ("wint2", "wint8", "wint4"); returned lower-cased as "format".
    """
    config = _read_config(directory)
    quant = config.get("quantization_config")
    if quant is None and isinstance(config.get("text_config"), dict):
        quant = config["text_config"].get("quantization_config")
    if quant is None:
        return None
    source = str(directory / "config.json")
    return {"format": config_quant_method(quant, source), "path": source, "config": quant}


def config_quant_method(quant: Any, source: str) -> str:
    """The lower-cased method name of a `quantization_config` dict; ValueError if it has none."""
    if not isinstance(quant, dict):
        raise ValueError(f"{source}: quantization_config must be an object, got {type(quant).__name__}")
    method = quant.get("quant_method", quant.get("quantization"))
    if not isinstance(method, str) or not method:
        raise ValueError(f"{source}: quantization_config has no 'quant_method' (or FastDeploy "
                         f"'quantization') and there is no {DESCRIPTION_FILE} (an msModelSlim "
                         f"mindie_format leftover?)")
    return method.lower()


def checkpoint_model_format(directory: str | Path) -> str:
    """"paddle" or "torch", as FastDeploy's ModelConfig.read_model_config decides it from config.json
    (fastdeploy/config.py): `torch_dtype` -> torch; `dtype` -> torch when `transformers_version` is
    above 4.56.0 (transformers renamed the key), else paddle. Without either key: torch (an HF
    checkpoint; FastDeploy would refuse it). Paddle-format Linear weights are stored [k, n]."""
    config = _read_config(Path(directory))
    if "torch_dtype" in config or "dtype" not in config:
        return "torch"
    version = tuple(int(part) for part in re.findall(r"\d+", str(config.get("transformers_version", "")))[:3])
    return "torch" if version > (4, 56, 0) else "paddle"


def _read_config(directory: Path) -> dict[str, Any]:
    """config.json as a dict ({} when absent)."""
    path = directory / "config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable config.json: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{path}: config.json must be a JSON object")
    return config
