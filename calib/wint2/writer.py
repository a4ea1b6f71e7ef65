"""Convert a float HF checkpoint into a FastDeploy-style WINT2 checkpoint.

    python -m calib.wint2.writer --model_path M --save_directory OUT \
        [--dense_wint2_modules mlp.gate_proj mlp.up_proj mlp.down_proj] [--dense_quant_type wint8]
        [--method plain|search|gptq --calib_file F.jsonl --calib_num_samples 32 --calib_seq_len 512
         --calib_holdout_samples 0 --act_order none group [quad] --code_scales 120.89453125 [...]
         --tune_epochs 0 --tune_lr 3e-3]

Decoder Linear weights (`model.layers.N.<...>_proj.weight`) matching `dense_wint2_modules` become
the five WINT2 tensors (ascend_llm/numerics/wint2.py, FastDeploy orientation); the other decoder
Linears become pre-quantized `dense_quant_type` (wint8: `weight` int8 [n, k] + `weight_scale`
[n] in the checkpoint dtype; wint4: `weight` uint8 [n, ceil(k/2)], low nibble = even k).
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
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from ascend_llm.loader import iter_safetensors_weights
from ascend_llm.loader.resolve import resolve_model_path
from ascend_llm.numerics import primitives as P
from ascend_llm.numerics import wint2 as L
from ascend_llm.quant.wint2 import DENSE_TYPES, WInt2Config
from calib.wint2 import encode as E
from calib.wint2.calibration import CalibSpec

if TYPE_CHECKING:
    from calib.wint2.gptq_writer import EncoderOptions

logger = logging.getLogger(__name__)

DEFAULT_WINT2_MODULES = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
METHODS = ("plain", "search", "gptq")
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
    return {**extra, "quantization": "wint2", "is_quantized": True, "dense_quant_type": dense_quant_type,
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
                           dense_wint4_modules: tuple[str, ...] = ()) -> WriteReport:
    """Write the WINT2 checkpoint of the float checkpoint at `model_path` into `save_directory`.

    `method` (module doc): "plain" ignores `calib`; "search" and "gptq" need it.
    `gptq_refine_passes`: coordinate-descent rounds after GPTQ (calib/wint2/refine.py).
    `encoder_options` (calib/wint2/gptq_writer.EncoderOptions; replaces method and
    gptq_refine_passes for the calibrated path): act-order and code_scale candidates.
    `dense_wint4_modules`: patterns of non-WINT2 dense layers written wint4 (quant/wint2.py).
    """
    if method not in METHODS:
        raise ValueError(f"method: {method!r} is not one of {METHODS}")
    if method != "plain" and calib is None:
        raise ValueError(f"method {method!r} needs calibration data (--calib_file)")
    src = Path(resolve_model_path(str(model_path)))
    out = Path(save_directory)
    if out.resolve() == src.resolve():
        raise ValueError(f"save_directory {out} must differ from model_path {src}")
    qconfig = quantization_config(tuple(dense_wint2_modules), dense_quant_type, tuple(dense_wint4_modules))
    selector = WInt2Config.from_config(qconfig, source="--dense_wint2_modules")
    calibrated: dict[str, L.Wint2Tensors] = {}
    if method != "plain":
        from calib.wint2.gptq_writer import calibrate_wint2   # transformers: only here
        calibrated = calibrate_wint2(src, selector.is_wint2_module, selector.dense_bits,
                                     method, calib, gptq_refine_passes, encoder_options)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    report = WriteReport()
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
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_config(src, out, qconfig)
    _copy_side_files(src, out)
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


def main(argv: list[str] | None = None) -> None:
    """CLI entry: convert, then print one line per converted module and the mean errors."""
    parser = argparse.ArgumentParser(prog="python -m calib.wint2.writer",
                                     description="float HF checkpoint -> FastDeploy-style WINT2 checkpoint")
    parser.add_argument("--model_path", required=True, help="float checkpoint directory or alias")
    parser.add_argument("--save_directory", required=True)
    parser.add_argument("--dense_wint2_modules", nargs="*", default=list(DEFAULT_WINT2_MODULES),
                        help="module-name patterns written as WINT2 ('re:<regex>' allowed)")
    parser.add_argument("--dense_quant_type", choices=sorted(DENSE_TYPES), default="wint8")
    parser.add_argument("--dense_wint4_modules", nargs="*", default=[],
                        help="patterns of non-WINT2 dense layers written wint4 instead (quant/wint2.py)")
    parser.add_argument("--method", choices=METHODS, default="plain",
                        help="plain: no calibration; search / gptq: need --calib_file (module doc)")
    parser.add_argument("--calib_file", default=None, help="JSON lines, key text / prompt")
    parser.add_argument("--calib_num_samples", type=int, default=32)
    parser.add_argument("--calib_seq_len", type=int, default=512)
    parser.add_argument("--calib_damp", type=float, default=0.1,
                        help="Hessian dampening, a fraction of mean(diag H) (calib/wint2/gptq.DAMP_NOTE)")
    parser.add_argument("--refine_passes", type=int, default=2,
                        help="gptq: coordinate-descent passes after GPTQ (0: GPTQ alone)")
    parser.add_argument("--calib_holdout_samples", type=int, default=0,
                        help="rows at the end of the calibration stream kept out of calibration")
    parser.add_argument("--act_order", nargs="+", default=["none", "group"], choices=["none", "group", "quad"],
                        help="gptq column orders tried; each row keeps its best (calib/wint2/act_order.py)")
    parser.add_argument("--code_scales", nargs="+", type=float, default=list(E.CODE_SCALE_CANDIDATES),
                        help="code_scale candidates, multiples of 1/256; each row keeps its best "
                             f"(calib/wint2/code_search.py; fastest: {E.DEFAULT_CODE_SCALES[0]} alone)")
    parser.add_argument("--tune_epochs", type=int, default=0,
                        help="then distil scales and norms from the float model (calib/wint2/tune.py); 0: off")
    parser.add_argument("--tune_lr", type=float, default=3e-3, help="Adam step of --tune_epochs (relative)")
    parser.add_argument("--tune_code_lr", type=float, default=0.0,
                        help="--tune_epochs also moves the WINT2 bytes (calib/wint2/tune_codes.py), Adam "
                             "step in window units; 0: bytes unchanged")
    parser.add_argument("--tune_group_lr", type=float, default=0.0,
                        help="--tune_epochs also moves the WINT2 group nibbles (calib/wint2/tune_groups.py), "
                             "relative Adam step; 0: nibbles unchanged")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.method != "plain" and not args.calib_file:
        parser.error(f"--method {args.method} needs --calib_file")
    calib = (CalibSpec(args.calib_file, args.calib_num_samples, args.calib_seq_len, damp=args.calib_damp,
                       holdout_samples=args.calib_holdout_samples) if args.calib_file else None)
    options = None
    if args.method != "plain":
        from calib.wint2.gptq_writer import EncoderOptions
        try:
            options = EncoderOptions(args.method, args.refine_passes, args.calib_damp, tuple(args.act_order),
                                     tuple(args.code_scales))
        except ValueError as exc:
            parser.error(str(exc))
    if args.tune_epochs and not args.calib_file:
        parser.error("--tune_epochs needs --calib_file")
    tune = None
    if args.tune_epochs:
        from calib.wint2.tune import TuneSpec
        try:
            tune = TuneSpec(args.tune_epochs, args.tune_lr, code_lr=args.tune_code_lr,
                            group_lr=args.tune_group_lr)
        except ValueError as exc:
            parser.error(str(exc))
    target = Path(args.save_directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".untuned-", dir=target.parent) if tune else nullcontext() as untuned:
        report = write_wint2_checkpoint(args.model_path, untuned or target,
                                        tuple(args.dense_wint2_modules), args.dense_quant_type,
                                        method=args.method, calib=calib, gptq_refine_passes=args.refine_passes,
                                        encoder_options=options,
                                        dense_wint4_modules=tuple(args.dense_wint4_modules))
        if tune:
            from calib.wint2.tune import tune_wint2_checkpoint
            tune_wint2_checkpoint(args.model_path, untuned, target, calib, tune)
    for module, kind, error in report.modules:
        print(f"{module:50s} {kind:6s} {error:.4f}")
    for kind in dict.fromkeys(("wint2", args.dense_quant_type, *(("wint4",) if args.dense_wint4_modules else ()))):
        print(f"mean relative error {kind}: {report.mean_error(kind):.4f}")


if __name__ == "__main__":
    main()
