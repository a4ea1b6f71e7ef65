"""Scales of the quantized paged KV cache: checkpoint names, the legacy JSON file, the first batch.

Sources, per attention layer (real value x ~= (q - offset) * scale in the cache):
- vLLM / AutoFP8 / llm-compressor: `self_attn.k_scale`, `self_attn.v_scale` (fp8 convention,
  scale = amax / 448), a single `kv_scale` for both, older `k_proj.output_scale` /
  `v_proj.output_scale`; per-tensor or per kv head.
- msModelSlim C8: `k_proj.kv_cache_scale` / `kv_cache_offset` and `v_proj.*`, per channel
  [num_kv_heads * head_dim], asymmetric int8: cache_int = round(cache / scale + offset).
- FastDeploy: `cachek_matmul.activation_scale` / `cachev_matmul.activation_scale` hold the
  activation bound `act`; the dequant scale is act / 127 (int8) or act / 448 (fp8).
- vLLM's legacy `--quantization-param-path` JSON: one fp8 scale per layer for K and V.
- `--calculate-kv-scales`: from the first batch, k: amax|k| / 200, v: amax|v| / 100 (vLLM's
  constants) for fp8; amax / 127 symmetric per layer for int8.

Rules (vLLM's BaseKVCacheMethod): fp8 without scales uses 1.0 with a warning; fp8_e5m2 ignores
scales; `auto` ignores them. An int8 cache without scales calculates them from the first batch
(int8 has no usable default). fp8-convention scales used for an int8 cache are rescaled by
448 / 127. Calculated scales replace loaded ones, except C8 scale + offset pairs.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from ascend_llm.ops.attention_metadata import KVCacheScales
from ascend_llm.quant.formats import detect_quant_format

if TYPE_CHECKING:
    from ascend_llm.layers.attention import Attention

logger = logging.getLogger(__name__)

FP8_E4M3_MAX = 448.0
INT8_MAX = 127.0
K_SCALE_CONSTANT, V_SCALE_CONSTANT = 200.0, 100.0   # vLLM's calculate_kv_scales divisors
_MIN_SCALE = 1e-8                                    # an all-zero first batch must not divide by 0

# checkpoint suffix after the attention prefix (`model.layers.N.self_attn.`) -> loaded key
_SCALE_NAMES = {
    "k_scale": "k_scale", "attn.k_scale": "k_scale", "k_proj.output_scale": "k_scale",
    "v_scale": "v_scale", "attn.v_scale": "v_scale", "v_proj.output_scale": "v_scale",
    "kv_scale": "kv_scale", "attn.kv_scale": "kv_scale",
    "k_proj.kv_cache_scale": "c8_k_scale", "k_proj.kv_cache_offset": "c8_k_offset",
    "v_proj.kv_cache_scale": "c8_v_scale", "v_proj.kv_cache_offset": "c8_v_offset",
    "cachek_matmul.activation_scale": "fd_k_act", "cachev_matmul.activation_scale": "fd_v_act",
}
# attention-compute scales (FA3 / ROCm fp8 attention) that a storage-only KV cache never uses
_UNUSED_NAMES = ("q_scale", "attn.q_scale", "prob_scale", "attn.prob_scale", "q_proj.output_scale")
_UNSUPPORTED_NAMES = ("cachek_matmul.activation_zero_point", "cachev_matmul.activation_zero_point")
_ATTN_PREFIX = "self_attn."
_C8_KEYS = ("c8_k_scale", "c8_k_offset", "c8_v_scale", "c8_v_offset")
_UNIT, _CALCULATED = "1.0 (none in checkpoint)", "calculated from the first batch"
_UNUSED = "checkpoint scales unused"


def kv_scale_key(name: str) -> tuple[str, str | None] | None:
    """(attention prefix, loaded key or None for an unused scale) of a KV-scale tensor name,
    or None when `name` is no KV-cache scale."""
    head, sep, suffix = name.rpartition(_ATTN_PREFIX)
    if not sep:
        return None
    prefix = head + _ATTN_PREFIX[:-1]
    if suffix in _SCALE_NAMES:
        return prefix, _SCALE_NAMES[suffix]
    if suffix in _UNUSED_NAMES:
        return prefix, None
    if suffix in _UNSUPPORTED_NAMES:
        raise ValueError(f"checkpoint tensor {name!r}: FastDeploy zero-point KV cache quantization "
                         "(int8_zp / int4_zp) is not supported; use a symmetric int8 or fp8 KV cache")
    return None


def load_kv_scale(model: nn.Module, name: str, tensor: torch.Tensor) -> bool:
    """Keep a KV-scale checkpoint tensor on its attention layer; False if `name` is no KV scale."""
    found = kv_scale_key(name)
    if found is None:
        return False
    prefix, key = found
    if key is None:
        logger.debug("%s: not used by a storage-only KV cache; skipped", name)
        return True
    try:
        attn = model.get_submodule(f"{prefix}.attn")
    except AttributeError:
        attn = None
    if getattr(attn, "checkpoint_kv_scales", None) is None:
        raise ValueError(f"checkpoint tensor {name!r}: no attention layer at {prefix!r} to take it")
    attn.checkpoint_kv_scales[key] = tensor.detach().to(torch.float32).clone()
    attn.layer_name = prefix
    return True


def checkpoint_kv_cache_dtype(kv_cache_dtype: str, model_dir: str | Path) -> str:
    """`--kv-cache-dtype` after the checkpoint's say: an msModelSlim C8 description switches
    `auto` to int8 (as vllm-ascend does) and rules out fp8."""
    found = detect_quant_format(model_dir)
    if found is None or found["format"] != "ascend" or not _is_c8(found["description"]):
        return kv_cache_dtype
    if kv_cache_dtype == "auto":
        logger.info("%s declares an int8 (C8) KV cache: kv_cache_dtype auto -> int8", found["path"])
        return "int8"
    if kv_cache_dtype != "int8":
        raise ValueError(f"kv_cache_dtype: {kv_cache_dtype!r} does not fit {found['path']}, which "
                         "holds int8 C8 KV-cache scales; use 'int8' or 'auto'")
    return kv_cache_dtype


def _is_c8(description: dict[str, Any]) -> bool:
    declared = description.get("kv_cache_type") or description.get("kv_quant_type")
    return declared == "C8" or any(v == "C8" for v in description.values())


def load_kv_scales_json(path: str | Path, num_layers: int, model_type: str | None,
                        tp_rank: int = 0, tp_size: int = 1) -> list[float]:
    """Per-layer KV scales of vLLM's legacy `--quantization-param-path` file (schema:
    {"model_type", "kv_cache": {"dtype": "float8_e4m3fn", "scaling_factor": {rank: {layer: s}}}})."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ValueError(f"quantization_param_path: {path} does not exist") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"quantization_param_path: {path} is not readable JSON: {exc}") from exc
    kv = doc.get("kv_cache") if isinstance(doc, dict) else None
    if not isinstance(kv, dict):
        raise ValueError(f"{path}: missing object 'kv_cache'")
    _check_json_header(path, doc, kv, model_type)
    ranks = kv.get("scaling_factor")
    if not isinstance(ranks, dict) or len(ranks) != tp_size:
        raise ValueError(f"{path}: kv_cache.scaling_factor must map exactly {tp_size} TP rank(s) to "
                         f"per-layer scales, got {ranks if not isinstance(ranks, dict) else len(ranks)}")
    layers = ranks.get(str(tp_rank))
    if not isinstance(layers, dict):
        raise ValueError(f"{path}: kv_cache.scaling_factor has no TP rank '{tp_rank}'")
    return [_json_scale(path, tp_rank, layers, i) for i in range(num_layers)]


def _check_json_header(path: Path, doc: dict[str, Any], kv: dict[str, Any],
                       model_type: str | None) -> None:
    if kv.get("dtype") != "float8_e4m3fn":
        raise ValueError(f"{path}: kv_cache.dtype must be 'float8_e4m3fn', got {kv.get('dtype')!r}")
    declared = doc.get("model_type")
    if declared is not None and model_type is not None and declared != model_type:
        raise ValueError(f"{path}: model_type {declared!r} does not match the model's {model_type!r}")


def _json_scale(path: Path, tp_rank: int, layers: dict[str, Any], layer: int) -> float:
    value = layers.get(str(layer))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"{path}: kv_cache.scaling_factor['{tp_rank}']['{layer}'] must be a positive "
                         f"number, got {value!r}")
    return float(value)


def calculate_kv_scales(key: torch.Tensor, value: torch.Tensor, kv_cache_dtype: str) -> KVCacheScales:
    """Per-layer scales from one batch's key/value [num_tokens, num_kv_heads, head_dim]."""
    k_amax, v_amax = key.detach().abs().amax().float(), value.detach().abs().amax().float()
    if kv_cache_dtype == "int8":
        k_scale, v_scale = k_amax / INT8_MAX, v_amax / INT8_MAX
    else:
        k_scale, v_scale = k_amax / K_SCALE_CONSTANT, v_amax / V_SCALE_CONSTANT
    return KVCacheScales(k_scale.clamp_min(_MIN_SCALE).reshape(1),
                         v_scale.clamp_min(_MIN_SCALE).reshape(1))


def unit_kv_scales(device: torch.device | None = None) -> KVCacheScales:
    """Scales of 1.0 (vLLM's default when an fp8 checkpoint has none)."""
    return KVCacheScales(torch.ones(1, device=device), torch.ones(1, device=device))


def resolve_kv_scales(loaded: dict[str, torch.Tensor], kv_cache_dtype: str, num_kv_heads: int,
                      head_dim: int, layer: str) -> tuple[KVCacheScales | None, str | None]:
    """(scales, source name) for one layer from its checkpoint tensors; (None, None) if none."""
    shape = (num_kv_heads, head_dim)
    if any(k in loaded for k in _C8_KEYS):
        if kv_cache_dtype != "int8":
            raise ValueError(f"{layer}: msModelSlim C8 kv_cache_scale/kv_cache_offset are int8 KV "
                             f"scales; use kv_cache_dtype 'int8', not {kv_cache_dtype!r}")
        k_scale, k_offset, v_scale, v_offset = (_c8_tensor(loaded, key, shape, layer) for key in _C8_KEYS)
        return KVCacheScales(k_scale, v_scale, k_offset, v_offset), "msModelSlim C8"
    if "fd_k_act" in loaded or "fd_v_act" in loaded:
        bound = INT8_MAX if kv_cache_dtype == "int8" else FP8_E4M3_MAX
        k_act, v_act = (_pick(loaded, name, "fd_k_act", "fd_v_act", layer) for name in ("k", "v"))
        return KVCacheScales(_scale(k_act, shape, layer, "cachek_matmul.activation_scale") / bound,
                             _scale(v_act, shape, layer, "cachev_matmul.activation_scale") / bound
                             ), "FastDeploy cache*_matmul.activation_scale"
    if not {"k_scale", "v_scale", "kv_scale"} & loaded.keys():
        return None, None
    k = _scale(_pick(loaded, "k", "k_scale", "v_scale", layer), shape, layer, "k_scale")
    v = _scale(_pick(loaded, "v", "k_scale", "v_scale", layer), shape, layer, "v_scale")
    if kv_cache_dtype == "int8":   # fp8 convention (amax / 448) -> int8 (amax / 127)
        k, v = k * (FP8_E4M3_MAX / INT8_MAX), v * (FP8_E4M3_MAX / INT8_MAX)
    return KVCacheScales(k, v), "checkpoint k_scale/v_scale"


def _pick(loaded: dict[str, torch.Tensor], which: str, k_key: str, v_key: str,
          layer: str) -> torch.Tensor:
    """The K or V tensor; a lone one (or `kv_scale`) serves both, as vLLM duplicates it."""
    own, other = (k_key, v_key) if which == "k" else (v_key, k_key)
    for key in (own, "kv_scale", other):
        if key in loaded:
            return loaded[key]
    raise ValueError(f"{layer}: no {which} scale among {sorted(loaded)}")


def _scale(t: torch.Tensor, shape: tuple[int, int], layer: str, name: str) -> torch.Tensor:
    """A positive finite scale: [1] (per layer) or [num_kv_heads, head_dim] (per head / channel)."""
    if not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
        raise ValueError(f"{layer}.{name}: KV scales must be positive and finite, got {t.flatten()[:4].tolist()}")
    return _per_channel(t, shape, layer, name)


def _per_channel(t: torch.Tensor, shape: tuple[int, int], layer: str, name: str) -> torch.Tensor:
    num_kv_heads, head_dim = shape
    t = t.float().flatten()
    if t.numel() == 1:
        return t.reshape(1)
    if t.numel() == num_kv_heads:
        return t.view(num_kv_heads, 1).expand(shape).contiguous()
    if t.numel() == num_kv_heads * head_dim:
        return t.view(shape).contiguous()
    raise ValueError(f"{layer}.{name}: {t.numel()} values; expected 1, num_kv_heads={num_kv_heads} "
                     f"or num_kv_heads*head_dim={num_kv_heads * head_dim}")


def _c8_tensor(loaded: dict[str, torch.Tensor], key: str, shape: tuple[int, int],
               layer: str) -> torch.Tensor:
    proj, kind = ("k_proj" if key.startswith("c8_k") else "v_proj"), key.rsplit("_", 1)[-1]
    name = f"{proj}.kv_cache_{kind}"
    if key not in loaded:
        raise ValueError(f"{layer}: msModelSlim C8 checkpoint lacks {name}")
    if kind == "scale":
        return _scale(loaded[key], shape, layer, name)
    return _per_channel(loaded[key], shape, layer, name)


def bind_kv_cache_scales(layers: list["Attention"], kv_cache_dtype: str, calculate: bool,
                         json_scales: list[float] | None = None,
                         device: torch.device | None = None) -> None:
    """Resolve every attention layer's scales (in layer order) and bind its cache kernels."""
    sources: Counter[str] = Counter()
    for index, attn in enumerate(layers):
        scales, source, pending = _layer_scales(attn, index, kv_cache_dtype, calculate, json_scales)
        attn.bind_kv_cache(kv_cache_dtype, scales, calculate=pending, device=device)
        sources[source] += 1
    if kv_cache_dtype != "auto":
        logger.info("KV cache %s scales: %s", kv_cache_dtype,
                    ", ".join(f"{src} ({n} layers)" for src, n in sources.items()))
    if sources.get(_UNUSED):
        logger.warning("the checkpoint has KV cache scales but kv_cache_dtype is 'auto'; they are "
                       "unused (pass --kv-cache-dtype fp8 or int8 to use them)")
    if kv_cache_dtype == "int8" and sources.get(_CALCULATED) and not calculate:
        logger.warning("int8 KV cache without checkpoint scales: calculating per-layer symmetric "
                       "scales (amax / 127) from the first batch")
    if sources.get(_UNIT):
        logger.warning("Using KV cache scaling factor 1.0 for fp8_e4m3; the checkpoint has no k/v "
                       "scales. Pass --calculate-kv-scales (or a checkpoint with k_scale/v_scale) "
                       "to avoid saturation or precision loss")


def _layer_scales(attn: "Attention", index: int, kv_cache_dtype: str, calculate: bool,
                  json_scales: list[float] | None) -> tuple[KVCacheScales | None, str, bool]:
    """(scales, source, calculate on first batch) of one layer."""
    if kv_cache_dtype == "auto":
        return None, _UNUSED if attn.checkpoint_kv_scales else "unquantized", False
    if kv_cache_dtype == "fp8_e5m2":
        return unit_kv_scales(), "1.0 (fp8_e5m2 uses no scales)", False
    scales, source = resolve_kv_scales(attn.checkpoint_kv_scales, kv_cache_dtype,
                                       attn.num_kv_heads, attn.head_dim,
                                       attn.layer_name or f"attention layer {index}")
    if source == "msModelSlim C8":
        return scales, source, False            # per-channel asymmetric: never recalculated
    if json_scales is not None:
        to_int8 = FP8_E4M3_MAX / INT8_MAX if kv_cache_dtype == "int8" else 1.0
        s = torch.tensor([json_scales[index] * to_int8])
        scales, source = KVCacheScales(s, s.clone()), "quantization_param_path JSON"
    if calculate or (scales is None and kv_cache_dtype == "int8"):
        return unit_kv_scales(), _CALCULATED, True
    if scales is None:
        return unit_kv_scales(), _UNIT, False
    return scales, source, False
