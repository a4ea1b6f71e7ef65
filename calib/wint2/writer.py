"""Convert a float HF checkpoint into a FastDeploy-style WINT2 checkpoint.

    python -m calib.wint2.writer --model_path M --save_directory OUT [--recipe NAME|PATH] [--overwrite] \
        [--dense_wint2_modules mlp.gate_proj mlp.up_proj mlp.down_proj] [--dense_quant_type wint8]
        [--method plain|search|gptq --calib_file F.jsonl --calib_num_samples 32 --calib_seq_len 512
         --calib_holdout_samples 0 --act_order none group [quad] --code_scales 120.89453125 [...]
         --tune_epochs 0 --tune_lr 3e-3]

Decoder Linear weights (`model.layers.N.<...>_proj.weight`) matching `dense_wint2_modules` become
the five WINT2 tensors (ascend_llm/numerics/wint2.py, FastDeploy orientation); the other decoder
Linears become pre-quantized `dense_quant_type` (wint8: `weight` int8 [n, k] + `weight_scale`
[n] in the checkpoint dtype; wint4: `weight` uint8 [n, ceil(k/2)], low nibble = even k): the
row-major layout, so the config says `is_permuted: false` (FastDeploy's default is its CUTLASS
layout; quant/weight_only_layout.py).
Embeddings, norms, biases and the LM head are copied unchanged. config.json gets a
`quantization_config` with `quantization: "wint2"`, and tokenizer files are copied.

Methods (how the WINT2 bytes and group scales are chosen; all write the same layout):
  plain   no calibration: nearest codeword, amax-based group scales (encode.encode_wint2)
  search  calibration: per-group nibble search minimising the H-diagonal-weighted error
  gptq    calibration: per-group nibble search + GPTQ error compensation (calib/wint2/gptq.py),
          then `--refine_passes` rounds of coordinate descent (calib/wint2/refine.py)
search / gptq run the float model on `--calib_file` layer by layer (calib/wint2/calibration.py);
gptq options: `--act_order` column orders and `--code_scales` candidates, each row keeping its
lowest-loss candidate (calib/wint2/act_order.py, calib/wint2/code_search.py);
`--calib_holdout_samples` keeps the stream's last rows out of calibration. `--dense_wint4_modules`
writes the non-WINT2 layers it matches as wint4 (e.g. the first / last layers' down_proj).
`--tune_epochs N` then trains the written checkpoint's scales and norms by distillation from the
float model on the same calibration rows (calib/wint2/tune.py; codes unchanged unless
`--tune_code_lr` > 0, calib/wint2/tune_codes.py; group nibbles unchanged unless `--tune_group_lr`
> 0, calib/wint2/tune_groups.py).
Measured perplexities: benchmarks/bench_wint2_quality.py.

Like `python -m calib`: `--recipe` reads option values from a YAML file or a bundled recipe in
calib/recipes/wint2/ (`wint2_gptq`: the README's best GPTQ + tuning configuration), and explicit
flags override them; a non-empty `--save_directory` is refused without `--overwrite`; the
checkpoint is written into a temporary sibling and renamed at the end (calib/output_dir.py), with
`calib_report.json` (tool, arguments, source model, times, per-module errors; calib/report.py);
bad options or inputs print one error line and exit with code 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from ascend_llm.loader import iter_safetensors_weights
from ascend_llm.loader.resolve import resolve_model_path
from ascend_llm.numerics import primitives as P
from ascend_llm.numerics import wint2 as L
from ascend_llm.quant.wint2 import DENSE_TYPES, WInt2Config
from calib.accuracy_reference import float_reference_from_checkpoint, record_and_write
from calib.config import RECIPES_DIR, CalibError, merge_recipe
from calib.output_dir import check_output_dir, staged_output
from calib.report import ToolReport
from calib.wint2 import encode as E
from calib.wint2.calibration import CalibSpec

if TYPE_CHECKING:
    from calib.wint2.gptq_writer import EncoderOptions

logger = logging.getLogger(__name__)

DEFAULT_WINT2_MODULES = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
METHODS = ("plain", "search", "gptq")
TOOL = "calib.wint2.writer"
WINT2_RECIPES_DIR = RECIPES_DIR / "wint2"
_LINEAR = re.compile(r"^(model\.layers\.\d+\..*_proj)\.weight$")


@dataclass(slots=True)
class WriteReport:
    """Per converted module: (module name, kind, relative weight error)."""
    modules: list[tuple[str, str, float]] = field(default_factory=list)

    def mean_error(self, kind: str) -> float:
        errors = [e for _, k, e in self.modules if k == kind]
        return sum(errors) / len(errors) if errors else 0.0


def quantization_config(dense_wint2_modules: tuple[str, ...], dense_quant_type: str,
                        dense_wint4_modules: tuple[str, ...] = ()) -> dict:
    """The config.json `quantization_config` of a written checkpoint (`dense_wint4_modules`
    only when given)."""
    extra = {"dense_wint4_modules": list(dense_wint4_modules)} if dense_wint4_modules else {}
    return {**extra, "quantization": "wint2", "is_quantized": True, "is_permuted": False,
            "dense_quant_type": dense_quant_type,
            "moe_quant_type": "w4w2", "dense_wint2_modules": list(dense_wint2_modules),
            "moe_quant_config": {
                "moe_w4_quant_config": {"quant_type": "wint4", "quant_granularity": "per_channel",
                                        "quant_start_layer": 0, "quant_end_layer": 6},
                "moe_w2_quant_config": {"quant_type": "wint2", "quant_granularity": "pp_acc",
                                        "quant_group_size": L.GROUP_SIZE, "quant_start_layer": 7,
                                        "quant_end_layer": 10 ** 6}}}


def write_wint2_checkpoint(model_path: str | Path, save_directory: str | Path,
                           dense_wint2_modules: tuple[str, ...] = DEFAULT_WINT2_MODULES,
                           dense_quant_type: str = "wint8",
                           code_scales: tuple[float, ...] = E.DEFAULT_CODE_SCALES,
                           refine_steps: int = E.DEFAULT_REFINE_STEPS, method: str = "plain",
                           calib: CalibSpec | None = None, gptq_refine_passes: int = 2,
                           encoder_options: "EncoderOptions | None" = None,
                           dense_wint4_modules: tuple[str, ...] = (), overwrite: bool = False,
                           tool_report: ToolReport | None = None) -> WriteReport:
    """Write the WINT2 checkpoint of the float checkpoint at `model_path` into `save_directory`.

    `method` (module doc): "plain" ignores `calib`; "search" and "gptq" need it.
    `gptq_refine_passes`: coordinate-descent rounds after GPTQ (calib/wint2/refine.py).
    `encoder_options` (calib/wint2/gptq_writer.EncoderOptions; replaces method and
    gptq_refine_passes for the calibrated path): act-order and code_scale candidates.
    `dense_wint4_modules`: patterns of non-WINT2 dense layers written wint4 (quant/wint2.py).
    A non-empty `save_directory` is refused (CalibError) unless `overwrite`; the output is
    published atomically with `calib_report.json` (`tool_report`, or a new one naming this call).
    """
    if method not in METHODS:
        raise CalibError(f"method: {method!r} is not one of {METHODS}")
    if method != "plain" and calib is None:
        raise CalibError(f"method {method!r} needs calibration data (--calib_file)")
    try:
        src = Path(resolve_model_path(str(model_path)))
    except ValueError as exc:
        raise CalibError(f"--model_path: {exc}") from exc
    if Path(save_directory).resolve() == src.resolve():
        raise CalibError(f"save_directory {save_directory} must differ from model_path {src}")
    out = check_output_dir(save_directory, overwrite)
    if tool_report is None:
        tool_report = ToolReport(TOOL, str(model_path), str(save_directory), arguments={
            "dense_wint2_modules": list(dense_wint2_modules), "dense_quant_type": dense_quant_type,
            "dense_wint4_modules": list(dense_wint4_modules), "method": method, "code_scales": list(code_scales),
            "refine_steps": refine_steps, "gptq_refine_passes": gptq_refine_passes, "calib": calib,
            "encoder_options": encoder_options, "overwrite": overwrite})
    reference = float_reference_from_checkpoint(src, [], TOOL)   # generic prompts: the token stream may use every text
    qconfig = quantization_config(tuple(dense_wint2_modules), dense_quant_type, tuple(dense_wint4_modules))
    selector = WInt2Config.from_config(qconfig, source="--dense_wint2_modules")
    calibrated: dict[str, L.Wint2Tensors] = {}
    if method != "plain":
        from calib.wint2.gptq_writer import calibrate_wint2   # transformers: only here
        with tool_report.stage("calibrate"):
            calibrated = calibrate_wint2(src, selector.is_wint2_module, selector.dense_bits,
                                         method, calib, gptq_refine_passes, encoder_options)
    tensors: dict[str, torch.Tensor] = {}
    report = WriteReport()
    with tool_report.stage("encode"):
        for name, tensor in iter_safetensors_weights(src):
            match = _LINEAR.match(name)
            if match is None or tensor.dim() != 2 or not tensor.is_floating_point():
                tensors[name] = tensor.contiguous()
                continue
            module = match.group(1)
            if module in calibrated:
                converted, error = _calibrated(calibrated.pop(module), tensor)
                report.modules.append((module, "wint2", error))
            elif selector.is_wint2_module(module):
                converted, error = _to_wint2(tensor, code_scales, refine_steps)
                report.modules.append((module, "wint2", error))
            else:
                bits = selector.dense_bits(module)
                converted, error = _to_weight_only(tensor, bits)
                report.modules.append((module, f"wint{bits}", error))
            tensors.update({f"{module}.{key}": value.contiguous() for key, value in converted.items()})
            logger.info("%s: %s, relative error %.4f", module, report.modules[-1][1], error)
    kinds = dict.fromkeys(kind for _, kind, _ in report.modules)
    tool_report.summary.update(
        quantization_config=qconfig,
        mean_relative_error={kind: report.mean_error(kind) for kind in kinds},
        modules=[{"name": module, "kind": kind, "relative_error": error} for module, kind, error in report.modules])
    with staged_output(out) as staging:
        with tool_report.stage("write"):
            save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
            _write_config(src, staging, qconfig)
            _copy_side_files(src, staging)
        tool_report.write_json(staging)
        with tool_report.stage("accuracy_reference"):
            record_and_write(reference, staging)
    return report


def _to_wint2(weight: torch.Tensor, code_scales: tuple[float, ...],
              refine_steps: int) -> tuple[dict[str, torch.Tensor], float]:
    encoded = E.encode_wint2(weight, weight.dtype, code_scales, refine_steps)
    deq = L.dequantize_wint2(encoded.quant_weight, encoded.weight_scale, encoded.super_scales,
                             encoded.code_scale, encoded.code_zp)
    return encoded.as_dict(), E.relative_error(deq, weight)


def _calibrated(encoded: L.Wint2Tensors, weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], float]:
    if encoded.super_scales.dtype != weight.dtype:
        raise ValueError(f"wint2 writer: super_scales came out {encoded.super_scales.dtype}, "
                         f"the checkpoint weight is {weight.dtype}")
    deq = L.dequantize_wint2(*encoded.as_dict().values())
    return encoded.as_dict(), E.relative_error(deq, weight)


def _to_weight_only(weight: torch.Tensor, bits: int) -> tuple[dict[str, torch.Tensor], float]:
    q, scale = P.quantize_per_channel(weight, bits)                   # [n, k] int8, [n] fp32
    error = E.relative_error(P.dequantize_per_channel(q, scale), weight)
    packed = P.pack_int4(q) if bits == 4 else q
    return {"weight": packed.contiguous(), "weight_scale": scale.to(weight.dtype)}, error


def _write_config(src: Path, out: Path, qconfig: dict) -> None:
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    config["quantization_config"] = qconfig
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _copy_side_files(src: Path, out: Path) -> None:
    """Tokenizer and generation files: everything but weights, their index and config.json."""
    for path in src.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name not in (
                "config.json", "model.safetensors.index.json"):
            shutil.copy2(path, out / path.name)


_DEFAULTS: dict[str, Any] = {
    "dense_wint2_modules": list(DEFAULT_WINT2_MODULES), "dense_quant_type": "wint8", "dense_wint4_modules": [],
    "method": "plain", "calib_file": None, "calib_num_samples": 32, "calib_seq_len": 512, "calib_damp": 0.1,
    "refine_passes": 2, "calib_holdout_samples": 0, "act_order": ["none", "group"],
    "code_scales": list(E.CODE_SCALE_CANDIDATES), "tune_epochs": 0, "tune_lr": 3e-3, "tune_code_lr": 0.0,
    "tune_group_lr": 0.0, "overwrite": False}


def build_parser() -> argparse.ArgumentParser:
    """Every option defaults to None so that a recipe's value is only overridden when given
    (the defaults are `_DEFAULTS`, shown in the help)."""
    d = _DEFAULTS
    parser = argparse.ArgumentParser(prog=f"python -m {TOOL}",
                                     description="float HF checkpoint -> FastDeploy-style WINT2 checkpoint")
    parser.add_argument("--model_path", help="float checkpoint directory or alias (required)")
    parser.add_argument("--save_directory", help="output directory (required)")
    parser.add_argument("--recipe", help="YAML recipe file or bundled recipe name (calib/recipes/wint2/: "
                                         "wint2_gptq); explicit flags override it")
    parser.add_argument("--overwrite", action="store_const", const=True,
                        help="replace the content of a non-empty --save_directory")
    parser.add_argument("--dense_wint2_modules", nargs="*",
                        help="module-name patterns written as WINT2 ('re:<regex>' allowed; default "
                             f"{' '.join(d['dense_wint2_modules'])})")
    parser.add_argument("--dense_quant_type", choices=sorted(DENSE_TYPES), help=f"default {d['dense_quant_type']}")
    parser.add_argument("--dense_wint4_modules", nargs="*",
                        help="patterns of non-WINT2 dense layers written wint4 instead (quant/wint2.py)")
    parser.add_argument("--method", choices=METHODS,
                        help="plain (default): no calibration; search / gptq: need --calib_file (module doc)")
    parser.add_argument("--calib_file", help="JSON lines, key text / prompt")
    parser.add_argument("--calib_num_samples", type=int, help=f"default {d['calib_num_samples']}")
    parser.add_argument("--calib_seq_len", type=int, help=f"default {d['calib_seq_len']}")
    parser.add_argument("--calib_damp", type=float,
                        help="Hessian dampening, a fraction of mean(diag H) (calib/wint2/gptq.DAMP_NOTE; "
                             f"default {d['calib_damp']})")
    parser.add_argument("--refine_passes", type=int,
                        help="gptq: coordinate-descent passes after GPTQ (0: GPTQ alone; "
                             f"default {d['refine_passes']})")
    parser.add_argument("--calib_holdout_samples", type=int,
                        help="rows at the end of the calibration stream kept out of calibration (default 0)")
    parser.add_argument("--act_order", nargs="+", choices=["none", "group", "quad"],
                        help="gptq column orders tried; each row keeps its best (calib/wint2/act_order.py; "
                             f"default {' '.join(d['act_order'])})")
    parser.add_argument("--code_scales", nargs="+", type=float,
                        help="code_scale candidates, multiples of 1/256; each row keeps its best "
                             f"(calib/wint2/code_search.py; default {' '.join(map(str, d['code_scales']))}; "
                             f"fastest: {E.DEFAULT_CODE_SCALES[0]} alone)")
    parser.add_argument("--tune_epochs", type=int,
                        help="then distil scales and norms from the float model (calib/wint2/tune.py); 0: off")
    parser.add_argument("--tune_lr", type=float, help=f"Adam step of --tune_epochs (relative; default {d['tune_lr']})")
    parser.add_argument("--tune_code_lr", type=float,
                        help="--tune_epochs also moves the WINT2 bytes (calib/wint2/tune_codes.py), Adam "
                             "step in window units; 0 (default): bytes unchanged")
    parser.add_argument("--tune_group_lr", type=float,
                        help="--tune_epochs also moves the WINT2 group nibbles (calib/wint2/tune_groups.py), "
                             "relative Adam step; 0 (default): nibbles unchanged")
    return parser


def resolve_options(parser: argparse.ArgumentParser, argv: list[str] | None) -> dict[str, Any]:
    """Defaults < recipe < explicit flags, every value checked by its argparse type and choices
    (a recipe's YAML values go through the same conversion as the flags)."""
    cli = vars(parser.parse_args(argv))
    known = set(_DEFAULTS) | {"model_path", "save_directory"}
    merged = merge_recipe(cli, known=known, recipes_dir=WINT2_RECIPES_DIR)
    actions = {a.dest: a for a in parser._actions}
    options = {**_DEFAULTS, "model_path": None, "save_directory": None, "recipe": None}
    for key, value in merged.items():
        options[key] = _convert(actions[key], value, merged.get("recipe"))
    return options


def _convert(action: argparse.Action, value: Any, recipe: str | None) -> Any:
    """`value` (from argparse or a recipe) as the flag's type, checked against its choices."""
    if value is None:
        return None
    where = f"recipe {recipe}: {action.dest}" if recipe else action.option_strings[0]
    many = action.nargs in ("*", "+")
    if many and isinstance(value, str):
        value = value.split()
    elif many and isinstance(value, (int, float)):
        value = [value]
    if many != isinstance(value, (list, tuple)):
        raise CalibError(f"{where}: expected {'a list' if many else 'a single value'}, got {value!r}")
    convert = action.type or (lambda v: v)
    try:
        values = [convert(v) for v in value] if many else [convert(value)]
    except (TypeError, ValueError) as exc:
        raise CalibError(f"{where}: bad value {value!r} ({exc})") from exc
    if action.const is True and values != [True] and values != [False]:
        raise CalibError(f"{where}: expected true or false, got {value!r}")
    bad = [v for v in values if action.choices is not None and v not in action.choices]
    if bad:
        raise CalibError(f"{where}: {bad[0]!r} is not one of {sorted(action.choices)}")
    return values if many else values[0]


def main(argv: list[str] | None = None) -> int:
    """CLI entry: convert, then print one line per converted module and the mean errors.
    Returns the exit code: 0 done, 2 bad options or inputs (one error line, no traceback)."""
    parser = build_parser()
    logging.basicConfig(level=logging.WARNING)
    try:
        opts = resolve_options(parser, argv)
    except CalibError as exc:
        parser.error(str(exc))
    for required in ("model_path", "save_directory"):
        if not opts[required]:
            parser.error(f"--{required} is required (as a flag or in the --recipe)")
    if opts["method"] != "plain" and not opts["calib_file"]:
        parser.error(f"--method {opts['method']} needs --calib_file")
    if opts["tune_epochs"] and not opts["calib_file"]:
        parser.error("--tune_epochs needs --calib_file")
    calib = None
    if opts["calib_file"]:
        try:
            calib = CalibSpec(opts["calib_file"], opts["calib_num_samples"], opts["calib_seq_len"],
                              damp=opts["calib_damp"], holdout_samples=opts["calib_holdout_samples"])
        except ValueError as exc:
            parser.error(str(exc))
    options = None
    if opts["method"] != "plain":
        from calib.wint2.gptq_writer import EncoderOptions
        try:
            options = EncoderOptions(opts["method"], opts["refine_passes"], opts["calib_damp"],
                                     tuple(opts["act_order"]), tuple(opts["code_scales"]))
        except ValueError as exc:
            parser.error(str(exc))
    tune = None
    if opts["tune_epochs"]:
        from calib.wint2.tune import TuneSpec
        try:
            tune = TuneSpec(opts["tune_epochs"], opts["tune_lr"], code_lr=opts["tune_code_lr"],
                            group_lr=opts["tune_group_lr"])
        except ValueError as exc:
            parser.error(str(exc))
    tool_report = ToolReport(TOOL, str(opts["model_path"]), str(opts["save_directory"]), arguments=opts)
    write = dict(dense_wint2_modules=tuple(opts["dense_wint2_modules"]), dense_quant_type=opts["dense_quant_type"],
                 method=opts["method"], calib=calib, gptq_refine_passes=opts["refine_passes"],
                 encoder_options=options, dense_wint4_modules=tuple(opts["dense_wint4_modules"]),
                 tool_report=tool_report)
    try:
        if tune is None:
            report = write_wint2_checkpoint(opts["model_path"], opts["save_directory"], overwrite=opts["overwrite"],
                                            **write)
        else:
            from calib.wint2.tune import tune_wint2_checkpoint
            target = check_output_dir(opts["save_directory"], opts["overwrite"])    # before hours of work
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix=f".{target.name}.untuned-", dir=target.parent) as tmp:
                untuned = Path(tmp) / "untuned"
                report = write_wint2_checkpoint(opts["model_path"], untuned, **write)
                tune_wint2_checkpoint(opts["model_path"], untuned, target, calib, tune, overwrite=opts["overwrite"],
                                      tool_report=tool_report)
    except (CalibError, ValueError, OSError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    for module, kind, error in report.modules:
        print(f"{module:50s} {kind:6s} {error:.4f}")
    wint4 = ("wint4",) if opts["dense_wint4_modules"] else ()
    for kind in dict.fromkeys(("wint2", opts["dense_quant_type"], *wint4)):
        print(f"mean relative error {kind}: {report.mean_error(kind):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
