"""One calibration run: load -> (smooth) -> observe -> choose -> export -> report."""
from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from calib.accuracy_reference import float_reference, heldout_texts, record_and_write
from calib.config import CalibConfig, CalibError
from calib.dataset import load_calib_texts, tokenize_texts
from calib.export import LinearPlan, build_checkpoint, copy_side_files, write_checkpoint
from calib.finite import check_finite_activation, check_finite_weights
from calib.gptq_int8 import gptq_int8
from calib.mixed_format import FormatChoice, choose_formats
from calib.model_spec import LinearGroup, check_architecture, find_groups, group_of
from calib.observers import HistogramObserver, MinMaxObserver, RowSampler
from calib.output_dir import check_output_dir, staged_output
from calib.quantize import relative_error, simulate_linear
from calib.report import CalibReport, LayerRecord, timed_stage
from calib.rotation import RotationReport, apply_down_proj_rotation
from calib.sensitivity import expand_names, score_layers, select_float_layers
from calib.speed_aware import measure_speed_table, read_speed_table, speed_float_layers

logger = logging.getLogger(__name__)


@dataclass
class GroupStats:
    """What the observers saw at one group's input."""

    layer: str = ""                  # the Linear whose input this is (named in NaN / inf errors)
    minmax: MinMaxObserver = field(default_factory=MinMaxObserver)
    histogram: HistogramObserver | None = None
    rows: RowSampler | None = None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float().cpu()              # [T, k]
        check_finite_activation(x, self.layer)
        self.minmax.update(x)
        if self.histogram is not None:
            self.histogram.update(x)
        if self.rows is not None:
            self.rows.update(x)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def resolve_device(device_type: str) -> torch.device:
    """cpu, cuda (must be available) or npu (needs torch_npu); CalibError otherwise."""
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise CalibError("--device_type cuda: no CUDA device is available")
        return torch.device("cuda")
    if device_type == "npu":
        try:
            importlib.import_module("torch_npu")
        except ImportError as exc:
            raise CalibError("--device_type npu needs torch_npu (pip install ascend-llm[npu]) "
                             "and an Ascend device") from exc
        return torch.device("npu")
    return torch.device("cpu")


def load_model(model_path: str, device: torch.device,
               rotation: str | None = None) -> tuple[nn.Module, Any, Path, torch.dtype]:
    """(HF model in float32 on `device`, tokenizer, model dir, the checkpoint's own dtype);
    `rotation` (the requested --rotation) words the error for an architecture that cannot take it."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ascend_llm.loader.resolve import resolve_model_path

    try:
        model_dir = Path(resolve_model_path(model_path))
    except ValueError as exc:
        raise CalibError(f"--model_path: {exc}") from exc
    config = AutoConfig.from_pretrained(model_dir)
    check_architecture(config, str(model_dir / "config.json"), rotation)
    source_dtype = _config_dtype(config)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().to(device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer, model_dir, source_dtype


def _config_dtype(config: Any) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""), torch.float32)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


# ---------------------------------------------------------------------------------------------
# Observation
# ---------------------------------------------------------------------------------------------

@contextmanager
def _input_hooks(model: nn.Module, groups: list[LinearGroup], stats: dict[str, GroupStats]) -> Iterator[None]:
    """Feed each group's input (seen at its first member) to its GroupStats while active."""
    modules = dict(model.named_modules())

    def hook(key: str):
        def record(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            stats[key].update(args[0])
        return record

    handles = [modules[g.names[0]].register_forward_pre_hook(hook(g.key)) for g in groups]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


KVRanges = dict[str, tuple[torch.Tensor, torch.Tensor]]   # "...k_proj" -> per-channel (min, max)


def observe(model: nn.Module, groups: list[LinearGroup], batches: list[torch.Tensor], cfg: CalibConfig,
            full: bool = True, desc: str = "calibration") -> tuple[dict[str, GroupStats], KVRanges]:
    """Run the calibration batches; (group stats, per-channel KV-cache ranges if C8 is asked).

    `full` adds histograms and row samples (a min / max-only pass does not need them).
    """
    histogram = full and cfg.act_method in (2, 3) and cfg.linear_quant_type == "W8A8"
    stats = {g.key: GroupStats(layer=g.names[0], histogram=HistogramObserver() if histogram else None,
                               rows=RowSampler(cfg.sample_tokens, cfg.seed) if full else None)
             for g in groups}
    kv: KVRanges = {}
    device = next(model.parameters()).device
    decoder = model.model                    # the decoder alone: nobody needs the lm_head logits
    with _input_hooks(model, groups, stats), torch.inference_mode():
        for ids in tqdm(batches, desc=desc, disable=not cfg.progress):
            out = decoder(ids.to(device), use_cache=full and cfg.use_kvcache_quant)
            if full and cfg.use_kvcache_quant:
                _update_kv_ranges(kv, out.past_key_values)
    return stats, kv


def _update_kv_ranges(kv: KVRanges, cache: Any) -> None:
    """Per-channel (kv_heads * head_dim) min / max of the post-RoPE keys and the values."""
    for index, layer in enumerate(cache.layers):
        for proj, states in (("k_proj", layer.keys), ("v_proj", layer.values)):
            flat = states[0].transpose(0, 1).reshape(states.shape[2], -1).float().cpu()   # [seq, kv*hd]
            name = f"model.layers.{index}.self_attn.{proj}"
            lo, hi = flat.amin(dim=0), flat.amax(dim=0)
            if name in kv:
                lo, hi = torch.minimum(kv[name][0], lo), torch.maximum(kv[name][1], hi)
            kv[name] = (lo, hi)


# ---------------------------------------------------------------------------------------------
# Decisions
# ---------------------------------------------------------------------------------------------

def choose_observer(group: LinearGroup, stats: GroupStats, act_method: int,
                    weights: Any) -> tuple[str, tuple[float, float], dict[str, float]]:
    """(observer name, clip range, {candidate: output error}) for a static W8A8 group.

    act_method 1 / 2 take min-max / histogram; 3 takes whichever reproduces the group's outputs
    better on the sampled rows (errors summed over members).
    """
    if act_method == 1:
        return "minmax", stats.minmax.range(), {}
    if act_method == 2:
        return "histogram", stats.histogram.range(), {}
    candidates = {"minmax": stats.minmax.range(), "histogram": stats.histogram.range()}
    x = stats.rows.sample()
    errors = {}
    for name, x_range in candidates.items():
        errors[name] = 0.0
        for member in group.names:
            weight, bias = weights(member)
            errors[name] += relative_error(simulate_linear("FLOAT", weight, bias, x),
                                           simulate_linear("W8A8", weight, bias, x, x_range))
    best = min(candidates, key=lambda n: errors[n])
    return best, candidates[best], errors


def _weight_lookup(model: nn.Module) -> Any:
    modules = dict(model.named_modules())

    def lookup(name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        linear = modules[name]
        bias = linear.bias.detach().float().cpu() if linear.bias is not None else None
        return linear.weight.detach().float().cpu(), bias
    return lookup


def _apply_anti_outlier(model: nn.Module, cfg: CalibConfig, batches: list[torch.Tensor]) -> Any:
    try:
        anti_outlier = importlib.import_module("calib.anti_outlier")
    except ImportError as exc:
        raise CalibError(f"--anti_method {cfg.anti_method}: the anti-outlier module "
                         f"(calib/anti_outlier.py) is not available: {exc}") from exc
    try:
        return anti_outlier.apply_anti_outlier(model, cfg.anti_method, batches, w_bit=cfg.w_bit,
                                               a_bit=cfg.a_bit, is_dynamic=cfg.linear_quant_type != "W8A8",
                                               skip_down_proj=cfg.rotation is not None)
    except ValueError as exc:
        raise CalibError(f"--anti_method {cfg.anti_method}: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def stage(self, name: str) -> AbstractContextManager[None]:
        return timed_stage(self.seconds, name)


def run_calibration(cfg: CalibConfig, speed_clock: Callable[[], float] | None = None) -> CalibReport:
    """Calibrate `cfg.model_path` and write the checkpoint to `cfg.save_directory`; `speed_clock`:
    the timer of `--speed_aware auto` (time.perf_counter unless given)."""
    cfg.validate()
    if cfg.weight_only_calibration:           # int4 / GPTQ / groups / zero points / compressed-tensors
        from calib.weight_only import run_weight_only

        return run_weight_only(cfg)
    target = check_output_dir(cfg.save_directory, cfg.overwrite)
    slow = read_speed_table(cfg.speed_aware, cfg.speed_aware_batch) \
        if cfg.speed_aware and cfg.speed_aware != "auto" else {}
    timer = _Timer()
    with timer.stage("load"):
        texts = load_calib_texts(cfg.calib_file, cfg.num_samples)
        device = resolve_device(cfg.device_type)
        model, tokenizer, model_dir, source_dtype = load_model(cfg.model_path, device, cfg.rotation)
        check_finite_weights(model, "in the checkpoint")
        batches = tokenize_texts(tokenizer, texts, cfg.max_tokens)
        groups = find_groups(model)
        num_used = None if cfg.num_samples is None else len(texts)      # held out: the texts after these
        reference = float_reference(model, tokenizer, heldout_texts(cfg.calib_file, num_used), "calib.pipeline",
                                    str(model_dir))
    if cfg.speed_aware == "auto":
        with timer.stage("speed_aware"):
            slow = measure_speed_table(model, model_dir, groups, cfg, source_dtype, speed_clock)
    smooth_report = None
    if cfg.anti_method:
        with timer.stage("anti_outlier"):
            smooth_report = _apply_anti_outlier(model, cfg, batches)
            check_finite_weights(model, f"after anti-outlier {cfg.anti_method}")
    rotation: RotationReport | None = None
    if cfg.rotation:
        with timer.stage("rotation"):
            rotation = apply_down_proj_rotation(model, batches, cfg.hadamard_block_size, seed=cfg.seed)
            check_finite_weights(model, f"after --rotation {cfg.rotation}")
    with timer.stage("observe"):
        stats, kv_ranges = observe(model, groups, batches, cfg, full=True, desc="calibration")
    weights = _weight_lookup(model)
    records, plans = _plan(cfg, groups, stats, weights, timer,
                           speed_float_layers(slow, groups, cfg.speed_aware) if slow else {})
    gptq = None
    if cfg.w_method_name == "gptq":
        with timer.stage("gptq"):
            gptq = gptq_int8(model, groups, plans, batches, cfg.progress)
            check_finite_weights(model, "after GPTQ")
    by_name = group_of(groups)
    # the anti-outlier pass measured every group's input before folding: no extra forward pass
    before = {e.reader: e.absmax_before for e in smooth_report.entries} if smooth_report else {}
    for record in records.values():
        group = by_name[record.name]
        record.absmax_after = max(abs(v) for v in stats[group.key].minmax.range())
        record.outlier_score = stats[group.key].minmax.outlier_score
        record.absmax_before = before.get(group.names[0])
    with staged_output(target) as staging:
        with timer.stage("export"):
            tensors, description = build_checkpoint(model, plans, kv_ranges or None, source_dtype,
                                                    progress=cfg.progress, kv_asymmetric=cfg.kv_asymmetric,
                                                    online_hadamard=rotation.description() if rotation else None)
            write_checkpoint(staging, tensors, description, cfg.part_file_size)
            copy_side_files(model_dir, staging)
        report = CalibReport(str(model_dir), cfg.save_directory, str(description["model_quant_type"]),
                             options=_options(cfg), layers=list(records.values()),
                             stage_seconds=timer.seconds, anti_outlier=smooth_report,
                             kv_cache_type="C8" if kv_ranges else None, rotation=rotation,
                             gptq=gptq.to_dict() if gptq else None)
        report.write_json(staging)
        with timer.stage("accuracy_reference"):
            record_and_write(reference, staging)
    return report


def _plan(cfg: CalibConfig, groups: list[LinearGroup], stats: dict[str, GroupStats], weights: Any,
          timer: _Timer, slow: dict[str, str]) -> tuple[dict[str, LayerRecord], dict[str, LinearPlan]]:
    """Per-Linear records and export plans: type, observer / range, sensitivity, float fall-backs
    (`slow`: Linear -> reason, those `--speed_aware` keeps float)."""
    records: dict[str, LayerRecord] = {}
    ranges: dict[str, tuple[float, float] | None] = {}
    formats: dict[str, FormatChoice] = {}
    dynamic = _dynamic_groups(cfg, groups)
    samples = {g.key: stats[g.key].rows.sample() for g in groups}
    if cfg.mixed_format:
        with timer.stage("mixed_format"):
            formats = choose_formats(groups, weights, samples, progress=cfg.progress)
    with timer.stage("observers"):
        for group in tqdm(groups, desc="observers", disable=not cfg.progress):
            quant_type = formats[group.key].quant_type if formats else cfg.linear_quant_type
            if group.key in dynamic:
                quant_type = "W8A8_DYNAMIC"
            observer, x_range, errors = _observer_for(cfg, quant_type, group, stats[group.key], weights)
            ranges[group.key] = x_range
            for name in group.names:
                records[name] = LayerRecord(name, quant_type, observer, act_range=x_range,
                                            observer_errors=errors or None,
                                            format_errors=formats[group.key].errors if formats else None)
    scores: dict[str, float] = {}
    if cfg.num_float_layers:                 # scoring costs two matmuls per Linear: only when used
        with timer.stage("sensitivity"):
            scores = score_layers(groups, weights, samples, {n: r.quant_type for n, r in records.items()},
                                  ranges, progress=cfg.progress)
    floats = select_float_layers(scores, cfg.num_float_layers, list(cfg.disable_names), groups, slow)
    for name, record in records.items():
        record.sensitivity = scores.get(name)
        if name in floats:
            record.quant_type, record.float_reason, record.act_range, record.observer = \
                "FLOAT", floats[name], None, "-"
    plans = {name: LinearPlan(r.quant_type, r.act_range) for name, r in records.items()}
    return records, plans


def _dynamic_groups(cfg: CalibConfig, groups: list[LinearGroup]) -> set[str]:
    """Keys of the groups `--dynamic_names` makes W8A8_DYNAMIC; a pattern naming only part of a
    fused group is an error (one type per fused runtime layer)."""
    by_name = group_of(groups)
    named = {name for pattern in cfg.dynamic_names for name in expand_names(pattern, by_name, "--dynamic_names")}
    keys = set()
    for name in sorted(named):
        group = by_name[name]
        missing = [n for n in group.names if n not in named]
        if missing:
            raise CalibError(f"--dynamic_names: {name} is fused with {', '.join(missing)} in the runtime; "
                             f"name the whole group (one type per fused layer)")
        keys.add(group.key)
    return keys


def _observer_for(cfg: CalibConfig, quant_type: str, group: LinearGroup, stats: GroupStats,
                  weights: Any) -> tuple[str, tuple[float, float] | None, dict[str, float]]:
    """(observer name, static clip range or None, auto-choice errors) of one group."""
    if quant_type == "W8A8":
        observer, x_range, errors = choose_observer(group, stats, cfg.act_method, weights)
        if errors:
            logger.info("%s: %s chosen (output errors %s)", group.key, observer, errors)
        return observer, x_range, errors
    return ("weight-only" if quant_type == "W8A16" else "dynamic"), None, {}


def _options(cfg: CalibConfig) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(cfg).items()}
