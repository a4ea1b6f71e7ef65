"""`accuracy_reference.json`: the float model's answers on a fixed token set, shipped with a
quantized checkpoint so any runtime can check the quantized model against them.

Format (version 1; JSON, tens of KB):

    {
      "format": "ascend-llm-accuracy-reference",
      "version": 1,
      "writer": {"tool": "calib.pipeline", "version": "0.4.0"},
      "source_model": "/path/of/the/float/model",
      "top_k": 8,
      "prompts": [
        {"name": "heldout-0", "source": "calibration-heldout" | "generic" | "fixed",
         "token_ids": [int, ...],                 # 8..256 ids, no tokenizer needed to replay
         "top_ids": [[int] * top_k, ...],         # one row per scored position p = 0 .. len-2:
         "top_logprobs": [[float] * top_k, ...]}  #   the float model's top_k next-token ids and
      ],                                          #   log-probs after token_ids[:p + 1], best first
      "float": {"perplexity": float, "num_tokens": int},
      "at_conversion": null | {"mean_kl": float, "top1_agreement": float, "ppl_ratio": float,
                               "perplexity": float, "num_positions": int, "backend": "cpu", "note": str},
      "source_at_conversion": ...    # optional: a converter's / tuner's input's at_conversion
    }

`float.perplexity` is exp(mean -log p_float(token_ids[p + 1] | token_ids[:p + 1])) over every
scored position of every prompt. `at_conversion` holds the quantized checkpoint's own scores
(ascend_llm.eval.accuracy_guard, which defines them exactly) measured by the writing tool right
after conversion; null when the tool could not measure them.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FILE_NAME = "accuracy_reference.json"
FORMAT = "ascend-llm-accuracy-reference"
VERSION = 1
MIN_PROMPT_TOKENS = 8
MAX_PROMPT_TOKENS = 256
_KNOWN_KEYS = frozenset(("format", "version", "writer", "source_model", "top_k", "prompts", "float", "at_conversion"))


class AccuracyReferenceError(ValueError):
    """A missing or malformed accuracy_reference.json; the message says what is wrong."""


@dataclass(slots=True)
class ReferencePrompt:
    """One fixed sequence and the float model's top-k at each of its len-1 scored positions."""
    name: str
    source: str
    token_ids: list[int]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]


@dataclass(slots=True)
class AccuracyReference:
    """The parsed file (see the module docstring)."""
    writer: dict[str, str]
    source_model: str
    top_k: int
    prompts: list[ReferencePrompt]
    float_perplexity: float
    float_num_tokens: int
    at_conversion: dict[str, Any] | None = None
    version: int = VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        prompts = [dict(asdict(p), top_logprobs=[[round(v, 5) for v in row] for row in p.top_logprobs])
                   for p in self.prompts]
        return {"format": FORMAT, "version": self.version, "writer": self.writer,
                "source_model": self.source_model, "top_k": self.top_k, "prompts": prompts,
                "float": {"perplexity": self.float_perplexity, "num_tokens": self.float_num_tokens},
                "at_conversion": self.at_conversion, **self.extra}

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / FILE_NAME
        path.write_text(json.dumps(self.to_dict(), separators=(",", ":")) + "\n")
        return path


def reference_path(model_dir: str | Path) -> Path:
    return Path(model_dir) / FILE_NAME


def load_reference(model_dir: str | Path) -> AccuracyReference:
    """Read and validate `model_dir/accuracy_reference.json`; AccuracyReferenceError says what is
    missing or wrong (never a traceback from deep inside the parser)."""
    path = reference_path(model_dir)
    if not path.is_file():
        raise AccuracyReferenceError(
            f"{path}: no accuracy reference in the checkpoint (tools that write one: python -m calib, "
            f"calib.block_fp8, the WINT2 writer, calib.convert); for another tool's checkpoint pass "
            f"--reference FLOAT_MODEL")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AccuracyReferenceError(f"{path}: not valid JSON ({exc})") from None
    try:
        return parse_reference(data)
    except AccuracyReferenceError as exc:
        raise AccuracyReferenceError(f"{path}: {exc}") from None


def parse_reference(data: Any) -> AccuracyReference:
    if not isinstance(data, dict):
        raise AccuracyReferenceError("expected a JSON object")
    if data.get("format") != FORMAT:
        raise AccuracyReferenceError(f"format: expected {FORMAT!r}, got {data.get('format')!r}")
    if data.get("version") != VERSION:
        raise AccuracyReferenceError(f"version: this runtime reads version {VERSION}, got {data.get('version')!r}")
    top_k = _field(data, "top_k", int)
    if top_k < 1:
        raise AccuracyReferenceError(f"top_k: must be >= 1, got {top_k}")
    raw_prompts = _field(data, "prompts", list)
    if not raw_prompts:
        raise AccuracyReferenceError("prompts: empty")
    prompts = [_parse_prompt(p, i, top_k) for i, p in enumerate(raw_prompts)]
    ref_float = _field(data, "float", dict)
    ppl = _number(ref_float, "float.perplexity")
    at_conversion = data.get("at_conversion")
    if at_conversion is not None and not isinstance(at_conversion, dict):
        raise AccuracyReferenceError("at_conversion: expected an object or null")
    writer = data.get("writer") if isinstance(data.get("writer"), dict) else {}
    extra = {k: v for k, v in data.items() if k not in _KNOWN_KEYS}     # e.g. source_at_conversion
    return AccuracyReference(writer, str(data.get("source_model", "")), top_k, prompts, ppl,
                             int(ref_float.get("num_tokens", 0)), at_conversion, extra=extra)


def _parse_prompt(raw: Any, index: int, top_k: int) -> ReferencePrompt:
    where = f"prompts[{index}]"
    if not isinstance(raw, dict):
        raise AccuracyReferenceError(f"{where}: expected an object")
    ids = _field(raw, "token_ids", list, where)
    if not MIN_PROMPT_TOKENS <= len(ids) <= MAX_PROMPT_TOKENS or not all(_is_id(t) for t in ids):
        raise AccuracyReferenceError(f"{where}.token_ids: expected {MIN_PROMPT_TOKENS}..{MAX_PROMPT_TOKENS} "
                                     f"non-negative integers")
    top_ids = _field(raw, "top_ids", list, where)
    top_lps = _field(raw, "top_logprobs", list, where)
    rows = len(ids) - 1
    if len(top_ids) != rows or len(top_lps) != rows:
        raise AccuracyReferenceError(f"{where}: top_ids / top_logprobs need {rows} rows (one per scored "
                                     f"position), got {len(top_ids)} / {len(top_lps)}")
    for p, (id_row, lp_row) in enumerate(zip(top_ids, top_lps)):
        ok = (isinstance(id_row, list) and isinstance(lp_row, list) and len(id_row) == len(lp_row) == top_k
              and all(_is_id(t) for t in id_row) and all(_is_logprob(v) for v in lp_row))
        if not ok:
            raise AccuracyReferenceError(f"{where} position {p}: expected {top_k} token ids and {top_k} "
                                         f"finite log-probs <= 0")
    return ReferencePrompt(str(raw.get("name", f"prompt-{index}")), str(raw.get("source", "")),
                           ids, top_ids, [[float(v) for v in row] for row in top_lps])


def _field(data: dict, key: str, kind: type, where: str = "") -> Any:
    name = f"{where}.{key}" if where else key
    if key not in data:
        raise AccuracyReferenceError(f"{name}: missing")
    value = data[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise AccuracyReferenceError(f"{name}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def _number(data: dict, name: str) -> float:
    value = data.get(name.rsplit(".", 1)[-1])
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise AccuracyReferenceError(f"{name}: expected a positive finite number, got {value!r}")
    return float(value)


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_logprob(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and value <= 1e-6)
