"""Sequential (error-propagating) calibration for the WINT2 writer: per-Linear input Hessians.

The float model (transformers, float32, CPU) runs the calibration tokens one decoder layer at a
time. For layer L: its dense (non-WINT2) Linears are replaced by their weight-only fake-quantized
values (what the loader will run), then its WINT2 Linears are quantized stage by stage in
execution order -- a stage is the set of Linears fed the same input tensor (q/k/v, o, gate/up,
down) -- each with the Hessian H = X^T X of its input captured from the partially quantized
layer, so later stages see the error of earlier ones. The layer's output, with every Linear
quantized, becomes layer L+1's input. A forward only runs as far as the stage it feeds.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ascend_llm.numerics import primitives as P
from ascend_llm.numerics import wint2 as L

logger = logging.getLogger(__name__)

Encoder = Callable[[str, torch.Tensor, torch.Tensor], L.Wint2Tensors]   # (name, W [n,k], H [k,k])


@dataclass(frozen=True, slots=True)
class CalibSpec:
    """Where the calibration tokens come from, how many, and the Hessian dampening."""
    calib_file: str
    num_samples: int = 32
    seq_len: int = 512
    chunk: int = 8            # samples per forward
    damp: float = 0.1         # damp * mean(diag H) added to H's diagonal (gptq.DAMP_NOTE)
    holdout_samples: int = 0  # rows at the end of the token stream never used for calibration

    def __post_init__(self) -> None:
        for name in ("num_samples", "seq_len", "chunk", "damp"):
            if getattr(self, name) <= 0:
                raise ValueError(f"calibration {name} must be positive, got {getattr(self, name)}")
        if self.holdout_samples < 0:
            raise ValueError(f"calibration holdout_samples must be >= 0, got {self.holdout_samples}")


def calibration_ids(tokenizer: Any, texts: list[str], num_samples: int, seq_len: int) -> torch.Tensor:
    """The texts tokenized, joined by EOS and cut into `num_samples` rows: int64 [S, seq_len]
    (fewer rows if the texts run out; ValueError if not even one)."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer.encode(text, add_special_tokens=False))
        if eos is not None:
            stream.append(eos)
        if len(stream) >= num_samples * seq_len:
            break
    rows = min(num_samples, len(stream) // seq_len)
    if rows == 0:
        raise ValueError(f"calibration texts give {len(stream)} tokens, fewer than calib_seq_len={seq_len}")
    return torch.tensor(stream[:rows * seq_len], dtype=torch.long).view(rows, seq_len)


def split_calibration_ids(tokenizer: Any, texts: list[str],
                          spec: CalibSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration rows [S, seq_len], held-out rows [spec.holdout_samples, seq_len]).

    With holdout_samples = 0 this is `calibration_ids` (and an empty held-out tensor). Otherwise
    every text is tokenized (joined by EOS), the held-out rows are the last whole rows of the
    stream and the calibration rows the first up to num_samples of the rest, so the two never
    share a token and the held-out rows do not depend on num_samples. ValueError if either side
    gets no row; fewer calibration rows than asked are logged.
    """
    seq_len, holdout = spec.seq_len, spec.holdout_samples
    if holdout == 0:
        return calibration_ids(tokenizer, texts, spec.num_samples, seq_len), torch.zeros(0, seq_len, dtype=torch.long)
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer.encode(text, add_special_tokens=False) + ([eos] if eos is not None else []))
    rows = len(stream) // seq_len
    calib_rows = min(spec.num_samples, rows - holdout)
    if calib_rows <= 0:
        raise ValueError(f"calibration texts give {rows} rows of {seq_len} tokens: none left for "
                         f"calibration after {holdout} held-out rows")
    if calib_rows < spec.num_samples:
        logger.warning("calibration: %d rows (asked %d), %d held out", calib_rows, spec.num_samples, holdout)
    ids = torch.tensor(stream[:rows * seq_len], dtype=torch.long).view(rows, seq_len)
    return ids[:calib_rows].clone(), ids[rows - holdout:].clone()


class _Stop(Exception):
    """Raised by a hook to end a forward once the needed inputs are seen."""


def fake_quant_dense(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-channel symmetric weight-only round trip (the loader's wint8 / wint4)."""
    q, scale = P.quantize_per_channel(weight, bits)
    return P.dequantize_per_channel(q, scale).to(weight.dtype)


class SequentialCalibrator:
    """Quantizes the WINT2 Linears of a transformers decoder model layer by layer (module doc)."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, is_wint2: Callable[[str], bool],
                 encoder: Encoder, dense_bits: int | Callable[[str], int], chunk: int = 8) -> None:
        self.model, self.is_wint2, self.encoder = model, is_wint2, encoder
        self.dense_bits = dense_bits
        self.layers = model.model.layers
        self.chunks = list(ids.split(chunk))
        self.results: dict[str, L.Wint2Tensors] = {}
        self._stage_cache: tuple[list[str], list[list[str]]] | None = None

    @torch.inference_mode()
    def run(self) -> dict[str, L.Wint2Tensors]:
        """{module name: WINT2 tensors} of every WINT2 Linear (names as in the checkpoint)."""
        states = [self._layer0_inputs(ids) for ids in self.chunks]      # [(hidden, kwargs)]
        for index, layer in enumerate(self.layers):
            prefix = f"model.layers.{index}"
            linears = {f"{prefix}.{name}": m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
            for name, module in linears.items():
                if not self.is_wint2(name):
                    bits = self.dense_bits(name) if callable(self.dense_bits) else self.dense_bits
                    module.weight.data = fake_quant_dense(module.weight.data, bits)
            for stage in self._stages(layer, prefix, linears, states[0]):
                self._quantize_stage(layer, stage, linears, states)
            states = [(layer(h, **kw), kw) for h, kw in states]
            logger.info("layer %d calibrated", index)
        return self.results

    def _layer0_inputs(self, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        caught: dict[str, Any] = {}

        def catch(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            caught["hidden"] = args[0] if args else kwargs.pop("hidden_states")
            caught["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            raise _Stop

        handle = self.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
        try:
            self.model.model(ids, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        kwargs = caught["kwargs"]
        kwargs["use_cache"], kwargs["past_key_values"] = False, None
        return caught["hidden"], kwargs

    def _stages(self, layer: nn.Module, prefix: str, linears: dict[str, nn.Linear],
                state: tuple[torch.Tensor, dict]) -> list[list[str]]:
        """WINT2 Linears grouped by shared input tensor, in execution order (found by one forward
        of the first layer whose Linears differ from the previous layer's, reused otherwise)."""
        local = sorted(name[len(prefix):] for name in linears)
        cached = self._stage_cache
        if cached is not None and cached[0] == local and all(
                self.is_wint2(prefix + n) for stage in cached[1] for n in stage) and sum(
                map(len, cached[1])) == sum(self.is_wint2(n) for n in linears):
            return [[prefix + n for n in stage] for stage in cached[1]]
        order: list[tuple[str, int]] = []
        handles = [m.register_forward_pre_hook(
            lambda _m, args, name=name: order.append((name, id(args[0])))) for name, m in linears.items()]
        try:
            layer(*state[:1], **state[1])
        finally:
            for handle in handles:
                handle.remove()
        stages: list[list[str]] = []
        last_input = None
        for name, input_id in order:
            if not self.is_wint2(name):
                continue
            if input_id != last_input:
                stages.append([])
            stages[-1].append(name)
            last_input = input_id
        self._stage_cache = (local, [[n[len(prefix):] for n in stage] for stage in stages])
        return stages

    def _quantize_stage(self, layer: nn.Module, stage: list[str], linears: dict[str, nn.Linear],
                        states: list[tuple[torch.Tensor, dict]]) -> None:
        first = linears[stage[0]]
        hessian = torch.zeros(first.in_features, first.in_features, dtype=torch.float64)

        def record(_module: nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()                      # [T, k]
            hessian.add_((x.t() @ x).double())
            raise _Stop

        handle = first.register_forward_pre_hook(record)
        try:
            for hidden, kwargs in states:
                try:
                    layer(hidden, **kwargs)
                except _Stop:
                    pass
        finally:
            handle.remove()
        for name in stage:
            module = linears[name]
            tensors = self.encoder(name, module.weight.data, hessian)
            self.results[name] = tensors
            module.weight.data = L.dequantize_wint2(*tensors.as_dict().values()).to(module.weight.dtype)
