"""The calibration summary: per-Linear rows (type, observer, activation range before / after
smoothing, sensitivity, float fall-back reason), stage times; printed as a table and written as
`calib_report.json` in the output directory.

`ToolReport` is the smaller report of the other checkpoint writers (calib.block_fp8,
calib.wint2.writer, calib.wint2.tune): tool, arguments, source model, start / end times, stage
seconds, and whatever per-layer summary the tool computes.
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPORT_FILE = "calib_report.json"


@dataclass
class LayerRecord:
    """One decoder Linear in the summary (absmax = max |x| of its input over the calibration set)."""

    name: str
    quant_type: str
    observer: str                                  # minmax | histogram | dynamic | weight-only | -
    absmax_before: float | None = None             # before anti-outlier smoothing (None: no smoothing)
    absmax_after: float | None = None              # what the observers saw
    act_range: tuple[float, float] | None = None   # the static clip range written (W8A8)
    sensitivity: float | None = None               # relative output error quantized alone
    outlier_score: float | None = None             # msModelSlim's max|x| / std
    float_reason: str | None = None
    observer_errors: dict[str, float] | None = None  # act_method 3: candidate -> output error
    format_errors: dict[str, float] | None = None  # MoFQ: candidate -> output error


@dataclass
class CalibReport:
    """Everything a run decided, with timings (seconds per stage)."""

    model_path: str
    save_directory: str
    model_quant_type: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    layers: list[LayerRecord] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    anti_outlier: Any = None
    kv_cache_type: str | None = None
    weight_only: dict[str, Any] | None = None     # calib/weight_only.py: output errors, GPTQ dampening
    rotation: Any = None                           # calib/rotation.py RotationReport (--rotation)
    gptq: dict[str, Any] | None = None             # calib/gptq_int8.py: int8 GPTQ output errors

    @property
    def float_layers(self) -> dict[str, str]:
        """Linear name -> why it stayed FLOAT."""
        return {r.name: r.float_reason or "" for r in self.layers if r.quant_type == "FLOAT"}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["anti_outlier"] = _jsonable(self.anti_outlier)
        data["rotation"] = self.rotation.to_dict() if self.rotation is not None else None
        data["float_layers"] = self.float_layers
        data["total_seconds"] = round(sum(self.stage_seconds.values()), 3)
        return data

    def write_json(self, out_dir: str | Path) -> Path:
        path = Path(out_dir) / REPORT_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    def format_table(self) -> str:
        """A fixed-width text table of the layers, the float fall-backs and the stage times."""
        header = (f"{'layer':<40} {'type':<17} {'observer':<11} {'|x| before':>10} {'|x| after':>10} "
                  f"{'clip lo':>9} {'clip hi':>9} {'sens.':>9}")
        lines = [f"model_quant_type: {self.model_quant_type}", header, "-" * len(header)]
        for r in self.layers:
            lo, hi = r.act_range if r.act_range else (None, None)
            lines.append(f"{r.name:<40} {r.quant_type:<17} {r.observer:<11} {_num(r.absmax_before):>10} "
                         f"{_num(r.absmax_after):>10} {_num(lo):>9} {_num(hi):>9} {_num(r.sensitivity):>9}")
        if self.rotation is not None:
            lines.append(f"rotation: hadamard({self.rotation.block_size}) online before "
                         f"{len(self.rotation.layers)} down_proj layers (runs in ascend-llm only)")
        if self.gptq is not None:
            lines.append(f"GPTQ int8 weights: mean output error {self.gptq['mean_output_error_rtn']:.4g} (nearest) "
                         f"-> {self.gptq['mean_output_error_gptq']:.4g}, dampening {self.gptq['damp_used']:g}")
            if self.gptq.get("raised_damp") or self.gptq.get("dead_input_channels"):
                lines.append(f"  singular Hessians: dampening raised for {self.gptq.get('raised_damp', [])}; input "
                             f"channels that saw no input: {self.gptq.get('dead_input_channels', {})}")
        floats = self.float_layers
        lines.append(f"float fall-backs ({len(floats)}):" + ("" if floats else " none"))
        lines.extend(f"  {name}: {why}" for name, why in floats.items())
        lines.append("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.stage_seconds.items())
                     + f" (total {sum(self.stage_seconds.values()):.1f}s)")
        return "\n".join(lines)


@dataclass
class ToolReport:
    """What an offline tool ran on, with which arguments, when and for how long, plus its own
    summary (`summary` keys land at the top level of the JSON)."""

    tool: str                                      # e.g. "calib.wint2.writer"
    model_path: str
    save_directory: str
    arguments: dict[str, Any] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    def stage(self, name: str) -> AbstractContextManager[None]:
        """Add the wall time of the block to `stage_seconds[name]`."""
        return timed_stage(self.stage_seconds, name)

    def to_dict(self) -> dict[str, Any]:
        return {"tool": self.tool, "model_path": self.model_path, "save_directory": self.save_directory,
                "arguments": _jsonable(self.arguments), "started_at": _iso(self.started_at),
                "finished_at": _iso(time.time()), "stage_seconds": dict(self.stage_seconds),
                "total_seconds": round(sum(self.stage_seconds.values()), 3), **_jsonable(self.summary)}

    def write_json(self, out_dir: str | Path, name: str = REPORT_FILE) -> Path:
        path = Path(out_dir) / name
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def _jsonable(value: Any) -> Any:
    """The anti-outlier report (a dataclass, an object with to_dict(), or plain data) as JSON data."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "to_dict"):
        return _jsonable(value.to_dict())
    if is_dataclass(value):
        return _jsonable(asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return repr(value)


@contextmanager
def timed_stage(seconds: dict[str, float], name: str) -> Iterator[None]:
    """Add the wall time of the block to `seconds[name]` (rounded to ms)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = round(seconds.get(name, 0.0) + time.perf_counter() - start, 3)
