"""Per-Linear checkpoint tensors of each msModelSlim type, and the simulated ("fake-quant")
output of each type that the error-driven choices (auto observer, sensitivity, MoFQ) compare.

Formulas (msModelSlim's, as its ascendV1 saver writes them): weights [n, k], symmetric
per-channel int8; deq_scale = input_scale * weight_scale; quant_bias folds the float bias and
the activation zero point. WFP8AFP8_DYNAMIC: e4m3 weight [n, k] with a float32 per-channel
`weight_scale` [n, 1] = max|W_row| / 448, activations e4m3 per token at run time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ascend_llm.numerics import primitives as P
from ascend_llm.ops.cpu_int8 import dynamic_quant_per_token_reference
from ascend_llm.quant.w8a8 import encode_deq_scale_int64
from calib.observers import activation_qparams, fake_quant_activation

QUANT_TYPES = ("FLOAT", "W8A8", "W8A8_DYNAMIC", "W8A16", "WFP8AFP8_DYNAMIC")


def quantize_weight_int8(weight: torch.Tensor, scale: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (q [n, k] int8, scale [n] float32 = max|W_row| / 127),
    or the codes of weight on a given `scale` [n] (GPTQ's: its weights are codes * scale)."""
    if scale is None:
        return P.quantize_per_channel(weight.detach().float(), 8)
    scale = scale.float()
    return torch.round(weight.detach().float() / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale


def quantize_weight_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel e4m3: (q [n, k] float8_e4m3fn, scale [n] float32 = max|W_row| / 448)."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / P.FP8_MAX).clamp_min(1e-12)              # [n]
    return P.fp8_cast(w / scale[:, None]), scale                            # [n, k] e4m3


def w8a8_static_tensors(weight: torch.Tensor, bias: torch.Tensor | None, x_range: tuple[float, float],
                        deq_as_int64: bool, w_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """weight, input_scale, input_offset, deq_scale, quant_bias of one W8A8 (static) Linear."""
    q_w, w_scale = quantize_weight_int8(weight, w_scale)                             # [n, k], [n]
    scale, offset = activation_qparams(*x_range)
    return {"weight": q_w, **static_scale_tensors(q_w, w_scale, scale, offset, bias, deq_as_int64)}


def static_scale_tensors(q_w: torch.Tensor, w_scale: torch.Tensor, input_scale: float, offset: float,
                         bias: torch.Tensor | None, deq_as_int64: bool) -> dict[str, torch.Tensor]:
    """input_scale, input_offset [1], deq_scale [n] = input_scale * w_scale and quant_bias [n]
    int32 = round(bias / deq_scale - offset * sum_k q_w) of int8 weights q_w [n, k]; ValueError
    when quant_bias does not fit int32."""
    scale_t = torch.tensor([input_scale], dtype=torch.float32)             # [1]
    deq = (scale_t * w_scale).to(torch.float32)                             # [n]
    b = torch.zeros(q_w.shape[0], dtype=torch.float64) if bias is None else bias.detach().double()
    row_sums = q_w.double().sum(dim=1)                                      # [n]
    quant_bias = torch.round(b / deq.double() - offset * row_sums)          # [n]
    if bool((quant_bias.abs() > 2 ** 31 - 1).any()):
        raise ValueError("quant_bias overflows int32 (bias / deq_scale too large)")
    return {"input_scale": scale_t, "input_offset": torch.tensor([offset], dtype=torch.float32),
            "deq_scale": encode_deq_scale_int64(deq) if deq_as_int64 else deq,
            "quant_bias": quant_bias.to(torch.int32)}


def w8a8_dynamic_tensors(weight: torch.Tensor, w_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """weight [n, k] int8, weight_scale [n, 1], weight_offset zeros [n, 1] (W8A8_DYNAMIC)."""
    q_w, w_scale = quantize_weight_int8(weight, w_scale)
    return {"weight": q_w, "weight_scale": w_scale[:, None].clone(),
            "weight_offset": torch.zeros_like(w_scale)[:, None].clone()}


def w8a16_tensors(weight: torch.Tensor, w_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """W8A16 with msModelSlim's default symmetric weights (w_sym): offsets are zero."""
    return w8a8_dynamic_tensors(weight, w_scale)


def wfp8_dynamic_tensors(weight: torch.Tensor, with_offset: bool = False) -> dict[str, torch.Tensor]:
    """weight [n, k] float8_e4m3fn and weight_scale [n, 1] float32 (WFP8AFP8_DYNAMIC), plus
    weight_offset zeros [n, 1] float32 when `with_offset` (msModelSlim's saver writes it and
    vllm-ascend's W8A8FP8_DYNAMIC method declares it)."""
    q_w, w_scale = quantize_weight_fp8(weight)
    tensors = {"weight": q_w, "weight_scale": w_scale[:, None].clone()}
    if with_offset:
        tensors["weight_offset"] = torch.zeros_like(w_scale)[:, None].clone()
    return tensors


def layer_tensors(quant_type: str, weight: torch.Tensor, bias: torch.Tensor | None,
                  x_range: tuple[float, float] | None, deq_as_int64: bool,
                  fp8_offset: bool = False, w_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint tensors (suffix -> tensor) of one Linear; `bias` is written separately.
    `fp8_offset`: WFP8AFP8_DYNAMIC layers also get a zero `weight_offset`. `w_scale` [n]: the
    int8 weight scale to use (GPTQ's) instead of max |W_row| / 127."""
    if quant_type == "W8A8":
        if x_range is None:
            raise ValueError("W8A8 static needs the calibrated activation range")
        return w8a8_static_tensors(weight, bias, x_range, deq_as_int64, w_scale)
    if quant_type == "W8A8_DYNAMIC":
        return w8a8_dynamic_tensors(weight, w_scale)
    if quant_type == "W8A16":
        return w8a16_tensors(weight, w_scale)
    if quant_type == "WFP8AFP8_DYNAMIC":
        return wfp8_dynamic_tensors(weight, fp8_offset)
    if quant_type == "FLOAT":
        return {"weight": weight.detach().float().clone()}
    raise ValueError(f"unknown quant type {quant_type!r}; expected one of {', '.join(QUANT_TYPES)}")


def kv_cache_tensors(c_min: torch.Tensor, c_max: torch.Tensor, asymmetric: bool = False
                     ) -> dict[str, torch.Tensor]:
    """C8 per-channel int8 of a K or V cache: cache_int = round(cache / scale + offset).

    c_min, c_max: [kv_heads * head_dim] -> kv_cache_scale, kv_cache_offset float32 [same].
    Symmetric (the default, msModelSlim's): scale = max(|min|, |max|) / 127, offset 0 - the only
    form vllm-ascend decodes correctly (its C8 decode attention passes the scale alone).
    Asymmetric: scale = (max' - min') / 255 over the range widened to include 0, and
    offset = round(-min' / scale) - 128.
    """
    eps = torch.finfo(torch.float32).eps
    if not asymmetric:
        scale = (torch.maximum(c_min.float().abs(), c_max.float().abs()) / 127).clamp_min(eps)
        return {"kv_cache_scale": scale, "kv_cache_offset": torch.zeros_like(scale)}
    lo, hi = c_min.float().clamp_max(0), c_max.float().clamp_min(0)
    scale = ((hi - lo) / 255).clamp_min(eps)
    offset = (torch.round(-lo / scale) - 128).clamp(-128, 127)
    return {"kv_cache_scale": scale, "kv_cache_offset": offset}


# ---------------------------------------------------------------------------------------------
# Simulated outputs
# ---------------------------------------------------------------------------------------------

def _fake_int8_weight(weight: torch.Tensor) -> torch.Tensor:
    q, scale = quantize_weight_int8(weight)
    return P.dequantize_per_channel(q, scale)                               # [n, k]


def _fake_fp8_weight(weight: torch.Tensor) -> torch.Tensor:
    q, scale = quantize_weight_fp8(weight)
    return q.float() * scale[:, None]                                        # [n, k]


def _fake_int8_per_token(x: torch.Tensor) -> torch.Tensor:
    q, scale = dynamic_quant_per_token_reference(x)                         # [T, k], [T]
    return q.float() * scale[:, None]


def _fake_fp8_per_token(x: torch.Tensor) -> torch.Tensor:
    q, scale = P.quantize_fp8_per_token_group(x.float(), group_size=x.shape[1])   # [T, k], [T, 1]
    return q.float() * scale


def simulate_linear(quant_type: str, weight: torch.Tensor, bias: torch.Tensor | None,
                    x: torch.Tensor, x_range: tuple[float, float] | None = None) -> torch.Tensor:
    """The output [T, n] the runtime computes for x [T, k] with the Linear quantized as `quant_type`."""
    x, w = x.float(), weight.detach().float()
    if quant_type == "W8A8":
        if x_range is None:
            raise ValueError("W8A8 static needs the calibrated activation range")
        x_hat, w_hat = fake_quant_activation(x, *activation_qparams(*x_range)), _fake_int8_weight(w)
    elif quant_type == "W8A8_DYNAMIC":
        x_hat, w_hat = _fake_int8_per_token(x), _fake_int8_weight(w)
    elif quant_type == "W8A16":
        x_hat, w_hat = x, _fake_int8_weight(w)
    elif quant_type == "WFP8AFP8_DYNAMIC":
        x_hat, w_hat = _fake_fp8_per_token(x), _fake_fp8_weight(w)
    elif quant_type == "FLOAT":
        x_hat, w_hat = x, w
    else:
        raise ValueError(f"unknown quant type {quant_type!r}; expected one of {', '.join(QUANT_TYPES)}")
    return F.linear(x_hat, w_hat, None if bias is None else bias.detach().float())


def relative_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """sum |y - y_q|^2 / sum |y|^2 over outputs [T, n]: dominated by the highest-energy tokens,
    so it protects massive-activation tokens (the auto observer choice uses it)."""
    reference, approx = reference.float(), approx.float()
    diff = (reference - approx).reshape(-1)
    den = float(torch.dot(reference.reshape(-1), reference.reshape(-1)))
    return float(torch.dot(diff, diff)) / max(den, 1e-30)


def token_relative_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Mean over tokens of |y_t - y_q,t|^2 / |y_t|^2 for outputs [T, n]: every token counts alike,
    so a few massive-activation tokens cannot hide the error on the rest (sensitivity, MoFQ)."""
    reference, approx = reference.float(), approx.float()
    den = (reference * reference).sum(dim=-1).clamp_min(1e-30)               # [T]
    return float((((reference - approx) ** 2).sum(dim=-1) / den).mean())
