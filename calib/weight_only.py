"""Weight-only calibration (W4A16 / W8A16, per channel or per group) with MinMax or GPTQ rounding.

    python -m calib --model_path M --save_directory OUT --calib_file data.jsonl \
        --w_bit 4 --a_bit 16 --group_size 128 --w_method GPTQ [--w_sym false] \
        [--save_format ascendv1|compressed-tensors]

msModelSlim's options (`w_bit`, `a_bit`, `group_size`, `w_method` MinMax | GPTQ, `w_sym`): every
decoder Linear gets int codes with a float32 scale per output row and group of `group_size` input
columns (0 = per channel), symmetric (codes in [-2^(b-1), 2^(b-1) - 1], scale = amax / (2^(b-1) - 1))
or asymmetric (scale = (max - min) / (2^b - 1) over the range widened to 0, integer zero point):
W = (q - zp) * scale. The embeddings, norms and lm_head stay float, as msModelSlim leaves them.
`--anti_method m3` (msModelSlim's AWQ-style scale search; any of m1..m6) smooths the float model
first (calib/anti_outlier.py, scales folded into the norms / v_proj / up_proj rows).

MinMax rounds each weight to the nearest code of the min-max scales. GPTQ (calib/gptq.py) first
clips each row and group's range (CLIP_SHRINK, least diag(H)-weighted rounding error), keeps those
scales (computed from the float weights before rounding: "static groups") and rounds column by
column (in decreasing diag(H) order: act-order),
pushing each column's error onto the columns not yet rounded through the inverse Hessian of the
layer's calibration inputs (H = X^T X). The inputs are those of the model quantized so far: the
decoder layers are calibrated in order, each on the outputs of the layers before it with their
rounded weights (calib/sequential.py; SEQUENTIAL). The Linears of one
group (q/k/v, gate/up) share H and are rounded together; every token enters H at unit norm
(TOKEN_CAP), so a few massive-activation tokens cannot dominate it. A Hessian whose damped Cholesky factor
fails (singular, e.g. from too few tokens) is retried with 10x the dampening until it succeeds;
the dampening used per layer is in the report, never a NaN.

Output through the converters' writers (calib/convert/write_ascendv1.py: msModelSlim's W4A16 /
W8A16 layout with the description's `group_size`; calib/convert/write_compressed_tensors.py:
pack-quantized, group strategy, zero points when asymmetric). `calib_report.json` holds the
options, stage times and, per Linear, the relative output error on the calibration inputs of
min-max round-to-nearest ("rtn") and of the written weights, and the GPTQ dampening.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from calib.config import CalibConfig, CalibError
from calib.convert.neutral import NeutralCheckpoint, QuantLinear
from calib.convert.write_ascendv1 import write_ascendv1
from calib.convert.write_compressed_tensors import write_compressed_tensors
from calib.export import _float_state, copy_side_files
from calib.finite import check_finite_activation, check_finite_weights
from calib.gptq import gptq_round, output_error
from calib.model_spec import LinearGroup, find_groups
from calib.output_dir import check_output_dir, staged_output
from calib.report import CalibReport, LayerRecord, timed_stage
from calib.sequential import quantize_sequentially

logger = logging.getLogger(__name__)

WRITERS = {"ascendv1": write_ascendv1, "compressed-tensors": write_compressed_tensors}
MAX_DAMP = 1e4            # dampening retries stop here (x10 each)
# GPTQ defaults, measured on SmolLM2-135M W4A16 g64 (H from 8 x 512 calibration tokens, output
# error on 4 x 512 held-out tokens, layers 2 and 20): dampening 0.01 -> 0.1 and act-order
# (columns by decreasing diag(H), scales still static per group) lower the held-out error of
# every group but one, e.g. layer 2 q/k/v 0.0585 -> 0.0471, down_proj 0.0532 -> 0.0425 (RTN
# 0.0811 / 0.0684); layer 20 down_proj 0.1142 -> 0.1032 (RTN 0.1204).
GPTQ_DAMP = 0.1
ACT_ORDER = True
# GPTQ's scales: per row and group, the min-max range shrunk by the factor (of these) whose nearest
# rounding has the least diag(H)-weighted error (AWQ-style clipping). SmolLM2 W4A16, H from 8 x 512
# tokens, summed held-out output error of layers 2 and 20 (8 groups): g192 GPTQ 0.629 -> 0.532
# (RTN min-max 0.886), g64 0.534 -> 0.471 (RTN 0.763).
CLIP_SHRINK = tuple(1 - 0.05 * i for i in range(7))          # 1.0 .. 0.7
# Hessian tokens scaled to unit norm (every token's relative output error counts alike): SmolLM2's
# massive-activation tokens otherwise dominate H = X^T X and GPTQ fits them at the expense of the
# rest. SmolLM2 W4A16 g192, H from 16 x 512 tokens, perplexity on 2048 tokens of eval_tempest
# (fake-quant, float 36.48): plain GPTQ 1.902x -> 1.524x (RTN 1.653x); with clip, act-order and
# dampening 0.1: 1.239x -> 1.183x (norms capped at 4x the median instead: 1.824x / 1.226x).
TOKEN_CAP = 0.0
ANTI_OUTLIER_ROWS = 16    # calibration rows the anti-outlier scale search sees (2 forwards each)
MIN_GROUP = 8             # smallest group size offered when one does not divide
# GPTQ layer by layer on the quantized model's own activations (calib/sequential.py) instead of
# every Hessian from the float model
SEQUENTIAL = True


@dataclass
class Grid:
    """The integer grid of one Linear: codes in [qmin, qmax], per-row per-group scale / zero point."""

    bits: int
    group_size: int                    # columns per group (k when per channel)
    scale: torch.Tensor                # [n, G] float32
    zero: torch.Tensor | None          # [n, G] int (float-valued) or None (symmetric)

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def codes(self, w: torch.Tensor, first: int = 0, columns: torch.Tensor | None = None) -> torch.Tensor:
        """Nearest codes [n, b] (float-valued) of the columns w [n, b]: columns first.. first + b,
        or the weight's columns `columns` [b] (act-order)."""
        groups = self._groups(w.shape[1], first, columns)
        scale = self.scale[:, groups]                                         # [n, b]
        q = torch.round(w.float() / scale)
        if self.zero is not None:
            q = q + self.zero[:, groups]
        return q.clamp_(self.qmin, self.qmax)

    def dequantize(self, q: torch.Tensor, first: int = 0, columns: torch.Tensor | None = None) -> torch.Tensor:
        groups = self._groups(q.shape[1], first, columns)
        zero = 0.0 if self.zero is None else self.zero[:, groups]
        return (q - zero) * self.scale[:, groups]

    def _groups(self, b: int, first: int, columns: torch.Tensor | None) -> torch.Tensor:
        cols = torch.arange(first, first + b) if columns is None else columns
        return cols // self.group_size


def make_grid(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool,
              importance: torch.Tensor | None = None, shrink: tuple[float, ...] = (1.0,)) -> Grid:
    """Min-max scales (and zero points) of weight [n, k] per row and group (0 = per channel).

    With several `shrink` factors (a clip search, as AWQ's): each row and group keeps the factor
    of its min-max range whose nearest rounding has the least error sum_j d_j (w_j - w^_j)^2,
    d = `importance` [k] (diag(H): the output error without cross terms; ones when None)."""
    n, k = weight.shape
    g = group_size or k
    w = weight.detach().float().reshape(n, k // g, g)
    d = torch.ones(k) if importance is None else importance.float().clamp_min(0)
    d = d.reshape(1, k // g, g)
    best: Grid | None = None
    best_err = None
    for factor in shrink:
        grid = _minmax_grid(w, bits, symmetric, factor)
        q = grid.codes(w.reshape(n, k))
        err = ((grid.dequantize(q).reshape(n, k // g, g) - w) ** 2 * d).sum(dim=2)     # [n, G]
        if best is None:
            best, best_err = grid, err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best.scale = torch.where(better, grid.scale, best.scale)
        if best.zero is not None:
            best.zero = torch.where(better, grid.zero, best.zero)
    return best


def _minmax_grid(w: torch.Tensor, bits: int, symmetric: bool, factor: float) -> Grid:
    """The grid of w [n, G, g] over its per-group range scaled by `factor`."""
    g = w.shape[2]
    qmax = (1 << (bits - 1)) - 1
    if symmetric:
        scale = (w.abs().amax(dim=2) * factor / qmax).clamp_min(1e-10)        # [n, G]
        return Grid(bits, g, scale, None)
    lo, hi = w.amin(dim=2).clamp_max(0) * factor, w.amax(dim=2).clamp_min(0) * factor
    scale = ((hi - lo) / ((1 << bits) - 1)).clamp_min(1e-10)                  # [n, G]
    zero = (-(1 << (bits - 1)) - torch.round(lo / scale)).clamp(-(1 << (bits - 1)), qmax)
    return Grid(bits, g, scale, zero)


def round_to_nearest(weight: torch.Tensor, grid: Grid) -> torch.Tensor:
    """The nearest codes [n, k] (float-valued) of weight [n, k]."""
    return grid.codes(weight)


def gptq_codes(weight: torch.Tensor, grid: Grid, hessian: torch.Tensor, damp: float = GPTQ_DAMP,
               act_order: bool = ACT_ORDER) -> tuple[torch.Tensor, float]:
    """(GPTQ codes [n, k] float-valued on `grid`, the dampening used). A failed Cholesky of the
    damped H (singular or badly conditioned) is retried with 10x the dampening. `act_order`:
    columns rounded in decreasing diag(H) order (each still on its own group's scale)."""
    k = weight.shape[1]
    perm = torch.argsort(torch.diagonal(hessian), descending=True, stable=True) if act_order else torch.arange(k)
    groups = perm // grid.group_size
    scale = grid.scale[:, groups].contiguous()                        # [n, k] in rounding order
    zero = None if grid.zero is None else grid.zero[:, groups].contiguous()

    def round_columns(cols: torch.Tensor, first: int) -> torch.Tensor:
        s = scale[:, first:first + cols.shape[1]]
        if zero is None:
            return torch.round(cols / s).clamp_(grid.qmin, grid.qmax) * s
        z = zero[:, first:first + cols.shape[1]]
        return (torch.round(cols / s).add_(z).clamp_(grid.qmin, grid.qmax) - z) * s

    w, h = weight.float()[:, perm], hessian[perm][:, perm]
    while True:
        try:
            values = torch.empty_like(w)
            values[:, perm] = gptq_round(w, h, round_columns, damp=damp)
            break
        except torch.linalg.LinAlgError:
            if damp >= MAX_DAMP:
                raise
            logger.warning("GPTQ: Cholesky failed at dampening %g; retrying with %g", damp, damp * 10)
            damp *= 10
    codes = grid.codes(values)       # exact: every value is (code - zero) * scale of its group
    if not bool(torch.isfinite(values).all()):
        raise CalibError("GPTQ produced non-finite weights")
    return codes, damp


def group_size_error(name: str, k: int, group_size: int, all_k: list[int]) -> CalibError:
    """The error for a group size that does not divide the input dim k of Linear `name`, listing
    the group sizes that divide every Linear's input dim."""
    common = math.gcd(*all_k)
    sizes = [d for d in range(MIN_GROUP, common + 1) if common % d == 0]
    return CalibError(f"--group_size {group_size}: does not divide the input dim k={k} of {name}; "
                      f"group sizes that divide every Linear's input dim ({sorted(set(all_k))}): "
                      f"{', '.join(map(str, sizes)) or 'none >= %d' % MIN_GROUP} (or 0 = per channel)")


def check_group_size(model: nn.Module, groups: list[LinearGroup], group_size: int) -> None:
    if not group_size:
        return
    modules = dict(model.named_modules())
    dims = [(name, modules[name].in_features) for group in groups for name in group.names]
    for name, k in dims:
        if k % group_size:
            raise group_size_error(name, k, group_size, [k for _, k in dims])


def is_float(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def calibration_batches(tokenizer: Any, cfg: CalibConfig, chunk: int = 8) -> list[torch.Tensor]:
    """`num_samples` rows of `max_tokens` tokens (the texts joined by EOS), in [<= chunk, seq] batches."""
    from calib.dataset import load_calib_texts
    from calib.wint2.calibration import calibration_ids

    texts = load_calib_texts(cfg.calib_file)
    try:
        ids = calibration_ids(tokenizer, texts, cfg.num_samples, cfg.max_tokens)
    except ValueError as exc:
        raise CalibError(f"--calib_file: {exc}") from None
    if ids.shape[0] < cfg.num_samples:
        logger.warning("calibration: %d rows of %d tokens (asked %d)", ids.shape[0], cfg.max_tokens,
                       cfg.num_samples)
    return list(ids.split(chunk))


def run_weight_only(cfg: CalibConfig) -> CalibReport:
    """Calibrate `cfg.model_path` weight-only and write the checkpoint (module doc)."""
    from calib.pipeline import load_model, resolve_device

    cfg.validate()
    target = check_output_dir(cfg.save_directory, cfg.overwrite)
    seconds: dict[str, float] = {}
    gptq = cfg.w_method_name == "gptq"
    with timed_stage(seconds, "load"):
        model, tokenizer, model_dir, _ = load_model(cfg.model_path, resolve_device(cfg.device_type))
        check_finite_weights(model, "in the checkpoint")
        groups = find_groups(model)
        check_group_size(model, groups, cfg.group_size)
        batches = calibration_batches(tokenizer, cfg)
    smooth_report = None
    if cfg.anti_method:
        with timed_stage(seconds, "anti_outlier"):
            smooth_report = smooth(model, cfg, batches)
            check_finite_weights(model, f"after anti-outlier {cfg.anti_method}")
    modules = dict(model.named_modules())
    linears: dict[str, QuantLinear] = {}
    records: list[LayerRecord] = []
    errors: dict[str, dict[str, float]] = {}
    scheme = "int4_weight_only" if cfg.w_bit == 4 else "int8_weight_only"
    quant_type = "W4A16" if cfg.w_bit == 4 else "W8A16"

    def quantize_group(group: LinearGroup, hessian: torch.Tensor | None, write_back: bool) -> None:
        names = [n for n in group.names if not is_float(n, cfg.disable_names)]
        for name in sorted(set(group.names) - set(names)):
            records.append(LayerRecord(name, "FLOAT", "-", float_reason="--disable_names"))
        if not names:
            return
        weights = [modules[n].weight.detach().float().cpu() for n in names]
        stacked = torch.cat(weights)                                   # [sum n, k]
        minmax = make_grid(stacked, cfg.w_bit, cfg.group_size, cfg.w_sym)
        rtn = round_to_nearest(stacked, minmax)
        grid, codes, damp = minmax, rtn, None
        if gptq:
            grid = make_grid(stacked, cfg.w_bit, cfg.group_size, cfg.w_sym,
                             importance=torch.diagonal(hessian), shrink=CLIP_SHRINK)
            codes, damp = gptq_codes(stacked, grid, hessian)
        start = 0
        for name, weight in zip(names, weights):
            rows = slice(start, start + weight.shape[0])
            start += weight.shape[0]
            part, base = _rows(grid, rows), _rows(minmax, rows)
            bias = modules[name].bias
            linears[name] = QuantLinear(
                scheme, codes[rows].to(torch.int8), part.scale.contiguous(),
                bias=None if bias is None else bias.detach().float().cpu(),
                group_size=cfg.group_size,
                weight_zero_point=None if part.zero is None else part.zero.to(torch.int8).contiguous())
            err_rtn = output_error(weight, base.dequantize(rtn[rows]), hessian)
            err = output_error(weight, part.dequantize(codes[rows]), hessian) if gptq else err_rtn
            errors[name] = {"rtn": round(err_rtn, 6), "written": round(err, 6),
                            **({"damp": damp} if damp is not None else {})}
            records.append(LayerRecord(name, quant_type, cfg.w_method_name))
            if write_back:               # the later layers see this layer's quantized output
                target_weight = modules[name].weight
                target_weight.copy_(part.dequantize(codes[rows]).to(target_weight.dtype))

    if gptq and SEQUENTIAL:
        with timed_stage(seconds, "quantize"):
            quantize_sequentially(
                model, groups, batches, lambda group, store: hessian_hook(group, store, TOKEN_CAP),
                lambda layer_groups, store: [quantize_group(g, store[g.key], True) for g in layer_groups],
                cfg.progress)
    else:
        with timed_stage(seconds, "hessians"):            # also for MinMax: the report's output errors
            hessians = decoder_hessians(model, groups, batches, cfg.progress, token_cap=TOKEN_CAP)
        with timed_stage(seconds, "quantize"):
            for group in tqdm(groups, desc=f"{quant_type} ({cfg.w_method_name})", disable=not cfg.progress):
                quantize_group(group, hessians[group.key], False)
    checkpoint = NeutralCheckpoint(config=_config(model_dir))
    dtype = checkpoint.model_dtype()
    for name, tensor in _float_state(model).items():
        if name.rpartition(".")[0] not in linears:
            checkpoint.floats[name] = tensor.to(dtype)
    checkpoint.linears = linears
    summary = _summary(errors, cfg)
    with staged_output(target) as staging:
        with timed_stage(seconds, "export"):
            copy_side_files(model_dir, staging)
            WRITERS[cfg.save_format](checkpoint, staging)
        report = CalibReport(str(model_dir), cfg.save_directory, quant_type,
                             options=dataclasses.asdict(cfg), layers=records, stage_seconds=seconds,
                             anti_outlier=smooth_report, weight_only=summary)
        report.write_json(staging)
    logger.info("%s %s: mean output error rtn %.4f, written %.4f", quant_type, cfg.w_method_name,
                summary["mean_output_error_rtn"], summary["mean_output_error_written"])
    return report


@torch.inference_mode()
def decoder_hessians(model: nn.Module, groups: list[LinearGroup], batches: list[torch.Tensor],
                     progress: bool = True, token_cap: float | None = None) -> dict[str, torch.Tensor]:
    """group key -> H = X^T X [k, k] fp64 over every calibration token: each batch's product in
    float32 (a quarter of calib/hessians.py's fp64 matmul time), summed in float64; the decoder
    runs alone (nobody needs the lm_head logits)."""
    modules = dict(model.named_modules())
    hessians: dict[str, torch.Tensor] = {}
    handles = [modules[g.names[0]].register_forward_pre_hook(hessian_hook(g, hessians, token_cap)) for g in groups]
    device = next(model.parameters()).device
    try:
        for ids in tqdm(batches, desc="hessians", disable=not progress):
            model.model(input_ids=ids.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return hessians


def hessian_hook(group: LinearGroup, hessians: dict[str, torch.Tensor], token_cap: float | None):
    """A forward pre-hook adding the group's input X^T X (each batch in float32, summed in float64)
    to hessians[group.key]; `token_cap` as in `_cap_tokens` (None: tokens as they are)."""
    def record(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu()          # [T, k]
        check_finite_activation(x, group.names[0])
        if token_cap is not None:
            x = _cap_tokens(x, token_cap)
        product = (x.T @ x).double()
        if group.key in hessians:
            hessians[group.key] += product
        else:
            hessians[group.key] = product
    return record


def _cap_tokens(x: torch.Tensor, cap: float) -> torch.Tensor:
    """x [T, k] with every token whose norm exceeds `cap` x the median token norm scaled down to
    that norm (cap 0: every token to unit norm)."""
    norms = x.norm(dim=1).clamp_min(1e-12)                                     # [T]
    if cap == 0:
        return x / norms[:, None]
    limit = cap * norms.median()
    return x * (limit / norms).clamp(max=1.0)[:, None]


def smooth(model: nn.Module, cfg: CalibConfig, batches: list[torch.Tensor]) -> Any:
    """AWQ-style (m3) or another msModelSlim anti-outlier smoothing folded into the float model
    before rounding, its search measuring the output error of the `w_bit` weight quantizer of
    the run (per channel, or per group of `group_size` columns, as AWQ does) with float
    activations, on the first ANTI_OUTLIER_ROWS calibration rows. m3 scales by mean |x| (AWQ's
    statistic): SmolLM2 W4A16 RTN g64, 4096 tokens of each eval text, 1.507x / 1.548x float
    without smoothing, m3 with max |x| 1.288x / 1.327x, with mean |x| 1.263x / 1.309x."""
    from calib.anti_outlier import apply_anti_outlier

    rows = [row[None] for batch in batches for row in batch][:ANTI_OUTLIER_ROWS]     # [1, seq] each
    try:
        awq = {"statistic": "mean"} if cfg.anti_method == "m3" else {}     # AWQ's s = mean|x|^a
        return apply_anti_outlier(model, cfg.anti_method, rows, w_bit=cfg.w_bit, a_bit=16, group_size=cfg.group_size,
                                  **awq)
    except ValueError as exc:
        raise CalibError(f"--anti_method {cfg.anti_method}: {exc}") from exc


def _rows(grid: Grid, rows: slice) -> Grid:
    return Grid(grid.bits, grid.group_size, grid.scale[rows], None if grid.zero is None else grid.zero[rows])


def _config(model_dir: Path) -> dict:
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    config.pop("quantization_config", None)
    return config


def _summary(errors: dict[str, dict[str, float]], cfg: CalibConfig) -> dict[str, Any]:
    values = list(errors.values())
    mean = lambda key: sum(v[key] for v in values) / max(1, len(values))   # noqa: E731
    damps = sorted({v["damp"] for v in values if "damp" in v})
    return {"w_bit": cfg.w_bit, "group_size": cfg.group_size, "w_method": cfg.w_method_name,
            "symmetric": cfg.w_sym, "save_format": cfg.save_format,
            "mean_output_error_rtn": mean("rtn"), "mean_output_error_written": mean("written"),
            "damp_used": damps, "act_order": ACT_ORDER if cfg.w_method_name == "gptq" else None,
            "raised_damp": sorted(n for n, v in errors.items() if v.get("damp", GPTQ_DAMP) > GPTQ_DAMP),
            "layers": errors}
