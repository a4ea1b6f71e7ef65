"""Online Hadamard rotation before every `mlp.down_proj` (QuaRot's / SpinQuant's R4), for int8.

The inputs of `down_proj` (act(gate) * up) carry the massive activations: on SmolLM2-135M a few
tokens reach |x| ~ 3000 in one channel while the median token stays under 2, so one static
per-tensor int8 range cannot serve both. A block-diagonal Hadamard H (blocks of `block_size`,
normalized Sylvester, symmetric and orthonormal) spreads each token's outlier over its block:
the runtime computes y = (W H) (H x), with W H stored in the checkpoint and H x done online by
the registry op `hadamard_transform` (ascend_llm/numerics/hadamard.py; the description key `online_hadamard` tells the loader).

Rotation alone leaves the massive token ~ 200 against a median ~ 0.5; a SmoothQuant scale folded
from `up_proj` rows into `down_proj` columns first shrinks the outlier channels. Its exponent is
searched per layer on the rotated layer's output error (`ALPHA_GRID`, 0 = no smoothing):
the static range comes from every calibration token, the error from a random sample of them.
The float model's outputs are unchanged (up to rounding).

msModelSlim's QuaRot rotates the residual stream offline (R1) and, for W4A4, the down_proj input
online; vllm-ascend (as of 2026-12) has no online rotation for W8A8 and MindIE documents none,
so the ascendV1 checkpoint written with it runs in this runtime only (the export and the
vllm-ascend conformance check say so). `python -m calib.convert --to compressed-tensors` writes
the same rotation as compressed-tensors' `transform_config` in llm-compressor's SpinQuant R4 form
(ascend_llm/quant/compressed_tensors_transform.py), which vLLM runs on CUDA at TP 1.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ascend_llm.numerics.hadamard import hadamard_matrix
from calib.config import CalibError
from calib.quantize import relative_error, simulate_linear

logger = logging.getLogger(__name__)

ALPHA_GRID = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9)
MAX_AUTO_BLOCK = 512         # measured on SmolLM2 (intermediate 1536): 512 spreads enough
MIN_BLOCK = 16               # below this the spread (1 / sqrt(b)) is too small to be worth it
_EPS = 1e-5
_TOP_ROWS = 16               # highest-|x| tokens always kept for the static range
SAMPLE_ROWS = 1024           # random calibration tokens per layer for the error search


def block_hadamard(x: torch.Tensor, block: int) -> torch.Tensor:
    """x [..., d] -> x with every `block`-wide slice of the last dim multiplied by H_block
    (the same rotation as the runtime's `hadamard_transform`; W @ blockdiag(H) for a weight)."""
    h = hadamard_matrix(block, x.dtype, x.device)
    shape = x.shape
    return (x.reshape(*shape[:-1], shape[-1] // block, block) @ h).reshape(shape)


def auto_block_size(dim: int, where: str) -> int:
    """The largest power of two dividing `dim`, at most MAX_AUTO_BLOCK; CalibError below MIN_BLOCK."""
    block = dim & -dim
    block = min(block, MAX_AUTO_BLOCK)
    if block < MIN_BLOCK:
        raise CalibError(f"--rotation hadamard: cannot rotate {where}: its input size {dim} has no "
                         f"power-of-two factor >= {MIN_BLOCK} (the block-diagonal Hadamard needs one)")
    return block


@dataclass(slots=True)
class RotationEntry:
    """What the rotation did to one down_proj."""

    name: str
    alpha: float                 # SmoothQuant exponent folded from up_proj first (0 = none)
    error_plain: float           # relative output error, static W8A8 without smoothing / rotation
    error_rotated: float         # ... with the chosen smoothing and the rotation
    absmax_before: float         # max |x| over calibration tokens, before
    absmax_after: float          # ... after smoothing and rotation


@dataclass(slots=True)
class RotationReport:
    """The rotation applied by `apply_down_proj_rotation`; `layers` is what the description lists."""

    block_size: int
    entries: list[RotationEntry] = field(default_factory=list)

    @property
    def layers(self) -> list[str]:
        return [e.name for e in self.entries]

    def description(self) -> dict[str, object]:
        """The `online_hadamard` value of quant_model_description.json."""
        return {"block_size": self.block_size, "layers": self.layers}

    def to_dict(self) -> dict:
        return {"block_size": self.block_size, "layers": [asdict(e) for e in self.entries]}


@dataclass
class _Inputs:
    """One down_proj's calibration inputs: per-channel absmax, a row sample, the top rows."""

    absmax: torch.Tensor | None = None       # [k]
    lo: float = float("inf")
    hi: float = float("-inf")
    rows: list[torch.Tensor] = field(default_factory=list)
    top: torch.Tensor | None = None          # [<= _TOP_ROWS, k] highest-|x| tokens

    def update(self, x: torch.Tensor, keep: int, gen: torch.Generator) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float().cpu()                     # [T, k]
        amax = x.abs().amax(dim=0)
        self.absmax = amax if self.absmax is None else torch.maximum(self.absmax, amax)
        self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))
        pick = torch.randperm(x.shape[0], generator=gen)[:keep]
        self.rows.append(x[pick])
        pool = x if self.top is None else torch.cat([self.top, x])
        order = pool.abs().amax(dim=1).argsort(descending=True)[:_TOP_ROWS]
        self.top = pool[order]


def _collect(model: nn.Module, names: list[str], batches: list[torch.Tensor], rows_per_batch: int,
             seed: int) -> dict[str, _Inputs]:
    modules = dict(model.named_modules())
    gen = torch.Generator().manual_seed(seed)
    seen = {name: _Inputs() for name in names}
    handles = [modules[name].register_forward_pre_hook(
        lambda _m, args, name=name: seen[name].update(args[0], rows_per_batch, gen)) for name in names]
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for ids in batches:
                model.model(ids.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _scale(absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha), [k]."""
    if alpha == 0.0:
        return torch.ones_like(absmax)
    w = weight.abs().amax(dim=0).clamp_min(_EPS)
    return (absmax.clamp_min(_EPS).pow(alpha) / w.pow(1.0 - alpha)).clamp_min(_EPS)


def _error(weight: torch.Tensor, seen: _Inputs, scale: torch.Tensor | None, block: int | None) -> float:
    """Relative static-W8A8 output error of one candidate on the sampled rows."""
    x = torch.cat(seen.rows)                                                    # [t, k]
    extreme = torch.cat([x, seen.top])
    ref = x @ weight.T
    w = weight if scale is None else weight * scale
    xs, es = (x, extreme) if scale is None else (x / scale, extreme / scale)
    if block is not None:
        xs, es, w = block_hadamard(xs, block), block_hadamard(es, block), block_hadamard(w, block)
    if block is None and scale is None:
        x_range = (seen.lo, seen.hi)            # the observers' full min-max
    else:
        x_range = (float(es.min()), float(es.max()))
    return relative_error(ref, simulate_linear("W8A8", w, None, xs, x_range))


def _rotate_hook(block: int):
    def rotate(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (block_hadamard(args[0], block), *args[1:])
    return rotate


@torch.no_grad()
def apply_down_proj_rotation(model: nn.Module, batches: list[torch.Tensor], block_size: int = 0,
                             sample_rows: int = SAMPLE_ROWS, seed: int = 0) -> RotationReport:
    """Smooth (searched exponent) and rotate every decoder layer's mlp.down_proj in place.

    `model`: a transformers Llama / Qwen2 float model (eval). After the call each down_proj holds
    (W diag(s)) H, its up_proj rows are divided by s, and a forward pre-hook applies H to its
    input, so the model computes what it did before; `online_hadamard_block` is set on it.
    `block_size` 0 picks the largest power of two dividing intermediate_size (at most 512);
    about `sample_rows` random calibration tokens per layer (plus the most extreme ones) score
    the smoothing candidates.
    """
    inter = int(model.config.intermediate_size)
    block = block_size or auto_block_size(inter, "mlp.down_proj")
    if block & (block - 1) or block < MIN_BLOCK or inter % block:
        raise CalibError(f"--hadamard_block_size {block}: must be a power of two >= {MIN_BLOCK} dividing "
                         f"mlp.down_proj's input size {inter}")
    modules = dict(model.named_modules())
    names = [f"model.layers.{i}.mlp.down_proj" for i in range(model.config.num_hidden_layers)]
    for name in names:
        if getattr(modules.get(name), "online_hadamard_block", None):
            raise CalibError(f"{name}: already rotated")
    seen = _collect(model, names, batches, max(1, sample_rows // max(1, len(batches))), seed)
    report = RotationReport(block)
    for name in names:
        down, up = modules[name], modules[name.replace("down_proj", "up_proj")]
        weight = down.weight.detach().float().cpu()                             # [n, k]
        errors = {a: _error(weight, seen[name], _scale(seen[name].absmax, weight, a), block) for a in ALPHA_GRID}
        alpha = min(errors, key=errors.get)
        scale = _scale(seen[name].absmax, weight, alpha)                        # [k]
        _fold(up, down, scale, block)
        extreme = block_hadamard(seen[name].top / scale, block)
        report.entries.append(RotationEntry(name, alpha, _error(weight, seen[name], None, None), errors[alpha],
                                            float(seen[name].absmax.max()), float(extreme.abs().max())))
    logger.info("rotation: hadamard(%d) before %d down_proj layers", block, len(names))
    return report


def _fold(up: nn.Linear, down: nn.Linear, scale: torch.Tensor, block: int) -> None:
    """up rows / s, down <- (W diag(s)) H, and the online H on down's input."""
    s = scale.to(up.weight.device)
    up.weight.data = up.weight.data / s[:, None].to(up.weight.dtype)
    if up.bias is not None:
        up.bias.data = up.bias.data / s.to(up.bias.dtype)
    w = down.weight.data.float() * s[None, :]
    down.weight.data = block_hadamard(w, block).to(down.weight.dtype)
    down.register_forward_pre_hook(_rotate_hook(block))
    down.online_hadamard_block = block
