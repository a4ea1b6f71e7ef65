"""`--speed_aware PATH`: keep in float the Linears whose quantized kernel was measured slower than
float on the target backend.

PATH is the JSON that `ascend-llm inspect QUANTIZED_MODEL --bench --bench-output PATH` writes
(the audit report with the "bench" table, `ascend_llm/quant/kernel_bench.py`): per layer shape the
runtime layers it covers, their quantized and float microseconds per batch size and a `slower`
flag. Every layer flagged slower at `--speed_aware_batch` (default 1, decode) stays FLOAT here,
with the measured times and ratio as the reason in calib_report.json.

The runtime fuses q/k/v into qkv_proj and gate/up into gate_up_proj; a fused runtime layer maps to
its HF Linears (`DEFAULT_PACKED_MODULES`), which are one group here and stay float together.
Layers that were FLOAT in the benchmarked checkpoint have no quantized timing and are not flagged.

`--speed_aware auto` makes that table here, before calibrating (`measure_speed_table`): every
decoder Linear of the float model is written as the run's planned type (W8A8 static with a
placeholder activation range: the speed does not depend on it) to a temporary directory, which
the runtime loads on `--device_type` and times at `--speed_aware_batch` (`LLMEngine.kernel_bench`).
"""
from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ascend_llm.quant.w8a8 import DEFAULT_PACKED_MODULES
from calib.config import CalibConfig, CalibError
from calib.export import LinearPlan, build_checkpoint, copy_side_files, write_checkpoint
from calib.model_spec import LinearGroup, group_of

logger = logging.getLogger(__name__)
PLACEHOLDER_RANGE = (-4.0, 4.0)     # W8A8 static activation range of the timed stand-in checkpoint

INSPECT_HINT = "write one with `ascend-llm inspect QUANTIZED_MODEL --bench --bench-output PATH`"


def read_speed_table(path: str, batch: int) -> dict[str, str]:
    """Runtime layer name -> why it stays float, for every layer flagged slower at `batch`;
    CalibError naming the file and the problem when it is missing or malformed."""
    return parse_speed_table(_read_json(path), batch, path)


def parse_speed_table(data: Any, batch: int, path: str) -> dict[str, str]:
    """`read_speed_table` on already parsed JSON (`path` names its source in errors)."""
    bench = data.get("bench") if isinstance(data, dict) else None
    if not isinstance(bench, dict):
        raise CalibError(f"--speed_aware {path}: no 'bench' table in the file; {INSPECT_HINT}")
    measured = bench.get("batch_sizes")
    if not isinstance(measured, list) or batch not in measured:
        raise CalibError(f"--speed_aware_batch {batch}: {path} has timings at batch sizes {measured} only")
    shapes = bench.get("shapes")
    if not isinstance(shapes, list):
        raise CalibError(f"--speed_aware {path}: bench.shapes must be a list; {INSPECT_HINT}")
    backend = bench.get("backend", data.get("backend", "?"))
    reasons: dict[str, str] = {}
    for index, shape in enumerate(shapes):
        quant_us, float_us, slower, layers = _shape_fields(path, index, shape, str(batch))
        if not slower:
            continue
        why = (f"--speed_aware: {shape.get('scheme', '?')} ({shape.get('kernels', '?')}) measured "
               f"{quant_us:.1f} us vs float {float_us:.1f} us at batch {batch} on {backend} "
               f"(ratio {quant_us / float_us:.2f})")
        reasons.update((layer, why) for layer in layers)
    return reasons


def _read_json(path: str) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CalibError(f"--speed_aware {path}: cannot read the file ({exc.strerror or exc}); {INSPECT_HINT}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CalibError(f"--speed_aware {path}: not valid JSON ({exc})") from exc


def _shape_fields(path: str, index: int, shape: Any, batch: str) -> tuple[float, float, bool, list[str]]:
    """(quantized us, float us, slower, layers) of bench.shapes[index] at `batch`."""
    where = f"--speed_aware {path}: bench.shapes[{index}]"
    if not isinstance(shape, dict):
        raise CalibError(f"{where} must be an object")
    values = []
    for key in ("quant_us", "float_us", "slower"):
        table = shape.get(key)
        if not isinstance(table, dict) or batch not in table:
            raise CalibError(f"{where}: '{key}' has no entry for batch {batch}")
        values.append(table[batch])
    quant_us, float_us, slower = values
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
               for v in (quant_us, float_us)):
        raise CalibError(f"{where}: quant_us / float_us at batch {batch} must be positive numbers, "
                         f"got {quant_us!r} / {float_us!r}")
    if not isinstance(slower, bool):
        raise CalibError(f"{where}: 'slower' at batch {batch} must be true or false, got {slower!r}")
    layers = shape.get("layers")
    if not isinstance(layers, list) or not all(isinstance(name, str) for name in layers):
        raise CalibError(f"{where}: 'layers' must be a list of layer names")
    return float(quant_us), float(float_us), slower, layers


def speed_float_layers(runtime_reasons: Mapping[str, str], groups: list[LinearGroup], path: str) -> dict[str, str]:
    """HF Linear name -> reason for every runtime layer in `runtime_reasons` (fused layers expand
    to their members); CalibError for a layer that is no decoder Linear of this model."""
    by_name = group_of(groups)
    reasons: dict[str, str] = {}
    for layer, why in runtime_reasons.items():
        prefix, _, leaf = layer.rpartition(".")
        members = [f"{prefix}.{m}" for m in DEFAULT_PACKED_MODULES.get(leaf, (leaf,))]
        unknown = [m for m in members if m not in by_name]
        if unknown:
            raise CalibError(f"--speed_aware {path}: layer {layer!r} is not a decoder Linear of this model "
                             f"(was the table measured on a checkpoint of another model?)")
        reasons.update((member, why) for member in members)
    return reasons


def measure_speed_table(model: nn.Module, model_dir: Path, groups: list[LinearGroup], cfg: CalibConfig,
                        source_dtype: torch.dtype, clock: Callable[[], float] | None = None) -> dict[str, str]:
    """`--speed_aware auto`: runtime layer name -> reason for every layer of the stand-in
    checkpoint (module doc) that the runtime measures slower than float on `cfg.device_type`."""
    from ascend_llm.llm import LLM

    quant_type = cfg.linear_quant_type
    x_range = PLACEHOLDER_RANGE if quant_type == "W8A8" else None
    plans = {name: LinearPlan(quant_type, x_range) for group in groups for name in group.names}
    tensors, description = build_checkpoint(model, plans, None, source_dtype, progress=False)
    with tempfile.TemporaryDirectory(prefix="calib_speed_aware_") as tmp:
        write_checkpoint(tmp, tensors, description, 0.0)
        copy_side_files(model_dir, tmp)
        del tensors
        llm = LLM(tmp, device=cfg.device_type, enforce_eager=True, kv_cache_memory_gb=0.01, max_model_len=32)
        try:
            bench = llm.llm_engine.kernel_bench((cfg.speed_aware_batch,), clock)
        finally:
            llm.shutdown()
    logger.info("--speed_aware auto on %s:\n%s", cfg.device_type, bench.table())
    return parse_speed_table({"bench": bench.to_dict()}, cfg.speed_aware_batch,
                             f"auto ({quant_type} stand-in measured on {cfg.device_type})")
