"""Distillation tuning of a written WINT2 checkpoint's continuous tensors (same layout, same codes
unless --code_lr).

    python -m calib.wint2.tune --model_path FLOAT --quant_path WINT2_DIR \
        --save_directory OUT --calib_file F.jsonl [--calib_num_samples 32 --calib_seq_len 512
        --epochs 3 --lr 3e-3 --calib_holdout_samples 4] [--overwrite]

GPTQ picks each Linear's codes against that Linear's own output error; what is left is a model
whose errors add up across 30 layers. This pass lowers the end-to-end error with the discrete
choices fixed: the student is the float model (transformers, float32, CPU) with every quantized
Linear replaced by its decoded codes times a trainable per-output-channel scale, and the teacher
is the float model. Trained on the calibration rows, by Adam, to minimise KL(teacher || student)
of the next-token distributions:

| trained (multiplicative, init 1)    | written back as                                 |
|-------------------------------------|-------------------------------------------------|
| WINT2 per-channel scale             | `super_scales` [n] (checkpoint dtype)           |
| wint8 / wint4 per-channel scale     | `weight_scale` [n] (checkpoint dtype)           |
| RMSNorm weights                     | the norm's `weight`                             |

Codes (`quant_weight`, the nibbles in the WINT2 `weight_scale`, `code_scale`, `code_zp`, int8 /
int4 weights), embeddings and the LM head are copied unchanged, so the output loads exactly like
the input. With `--code_lr` > 0 the WINT2 bytes (`quant_weight`) train too, by straight-through
rounding to each column's codebook (calib/wint2/tune_codes.py); with `--group_lr` > 0 the WINT2
4-bit group nibbles (in `weight_scale`) do, by straight-through rounding to integers
(calib/wint2/tune_groups.py); everything else stays as said. Held-out rows
(`--calib_holdout_samples`, taken from the end of the calibration stream) pick the best epoch;
without them the last epoch is kept.

Output as in `python -m calib` (calib/output_dir.py, calib/report.py): a non-empty
`--save_directory` is refused without `--overwrite`, the checkpoint is written into a temporary
sibling and renamed at the end, and `calib_report.json` holds the tool, arguments, models, times,
the per-epoch history and the input checkpoint's own report (`quant_report`); bad options or
inputs print one error line and exit with code 2.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ascend_llm.loader.resolve import resolve_model_path
from ascend_llm.numerics import primitives as P
from ascend_llm.numerics import wint2 as L
from calib.accuracy_reference import carry_over
from calib.config import CalibError
from calib.output_dir import check_output_dir, staged_output
from calib.report import REPORT_FILE, ToolReport
from calib.texts import read_calib_texts
from calib.wint2.calibration import CalibSpec, split_calibration_ids
from calib.wint2.student import ScaledCodeLinear
from calib.wint2.tune_codes import Wint2CodeLinear
from calib.wint2.tune_groups import Wint2GroupScaleLinear

logger = logging.getLogger(__name__)

TOOL = "calib.wint2.tune"


@dataclass(frozen=True, slots=True)
class TuneSpec:
    """How long and how fast the continuous tensors are trained."""
    epochs: int = 3
    lr: float = 3e-3          # Adam step on the relative change (3e-3 = 0.3% of the initial value)
    batch_size: int = 1       # calibration rows per optimizer step
    code_lr: float = 0.0      # > 0: WINT2 bytes move too (tune_codes.py), Adam step in window units
    group_lr: float = 0.0     # > 0: WINT2 group nibbles move too (tune_groups.py), relative Adam step

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"tune: epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"tune: lr must be positive, got {self.lr}")
        if not self.code_lr >= 0:
            raise ValueError(f"tune: code_lr must be >= 0 (0: codes fixed), got {self.code_lr}")
        if not self.group_lr >= 0:
            raise ValueError(f"tune: group_lr must be >= 0 (0: group nibbles fixed), got {self.group_lr}")
        if self.code_lr > 0 and self.group_lr > 0:
            raise ValueError("tune: code_lr and group_lr cannot both be > 0 (the bytes or the group nibbles "
                             "move, one at a time)")


class Relative(nn.Module):
    """Parametrization base * (1 + delta): delta starts at 0, so Adam's steps are relative."""

    def __init__(self, base: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("base", base.detach().float().clone())

    def forward(self, delta: torch.Tensor) -> torch.Tensor:
        return self.base * (1 + delta)

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(self.base)


def quantized_codes(tensors: dict[str, torch.Tensor], module: str,
                    in_features: int) -> tuple[torch.Tensor, torch.Tensor, str] | None:
    """(codes [n, k] float32, scale [n], scale tensor name) of `module` in a WINT2 checkpoint,
    or None when the module is not quantized there."""
    if f"{module}.quant_weight" in tensors:
        t = {name: tensors[f"{module}.{name}"] for name in L.TENSOR_NAMES}
        ones = torch.ones_like(t["super_scales"], dtype=torch.float32)
        codes = L.dequantize_wint2(t["quant_weight"], t["weight_scale"], ones, t["code_scale"], t["code_zp"])
        return codes, t["super_scales"], "super_scales"
    weight, scale = tensors.get(f"{module}.weight"), tensors.get(f"{module}.weight_scale")
    if weight is None or scale is None:
        return None
    if weight.dtype == torch.int8:
        return weight.float(), scale, "weight_scale"
    if weight.dtype == torch.uint8:
        return P.unpack_int4(weight, in_features).float(), scale, "weight_scale"
    raise ValueError(f"wint2_tune: {module}.weight has dtype {weight.dtype}, expected int8 or packed uint8")


def build_student(model: nn.Module, tensors: dict[str, torch.Tensor], move_codes: bool = False,
                  move_groups: bool = False) -> dict[str, tuple[ScaledCodeLinear, str]]:
    """Replace every quantized Linear of `model` (in place); {module name: (layer, scale name)}.
    move_codes: WINT2 Linears become `Wint2CodeLinear`s (their bytes train too); move_groups:
    `Wint2GroupScaleLinear`s (their group nibbles train too)."""
    from torch.nn.utils import parametrize

    with torch.no_grad():   # float tensors of the checkpoint (norms, embeddings) win over the float model's
        for name, param in model.named_parameters():
            value = tensors.get(name)
            if value is not None and value.is_floating_point() and value.shape == param.shape:
                param.copy_(value)
    replaced: dict[str, tuple[ScaledCodeLinear, str]] = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            found = quantized_codes(tensors, name, module.in_features)
            if found is None:
                continue
            codes, scale, scale_name = found
            if codes.shape != module.weight.shape:
                raise ValueError(f"wint2_tune: {name} decodes to {tuple(codes.shape)}, the float model "
                                 f"has {tuple(module.weight.shape)}")
            if (move_codes or move_groups) and scale_name == "super_scales":
                wint2 = {t: tensors[f"{name}.{t}"] for t in L.TENSOR_NAMES}
                layer = (Wint2CodeLinear if move_codes else Wint2GroupScaleLinear)(wint2, module.bias)
            else:
                layer = ScaledCodeLinear(codes, scale, module.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
            replaced[name] = (layer, scale_name)
    for name, module in model.named_modules():
        if type(module).__name__.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), nn.Parameter):
            parametrize.register_parametrization(module, "weight", Relative(module.weight))
    if not replaced:
        raise ValueError("wint2_tune: the checkpoint has no quantized Linear matching the float model")
    missing = sorted(quantized_modules(tensors) - replaced.keys())
    if missing:
        raise ValueError(f"wint2_tune: {len(missing)} quantized modules have no nn.Linear in the transformers "
                         f"model (e.g. {missing[0]}; fused MoE experts are not supported)")
    return replaced


def quantized_modules(tensors: dict[str, torch.Tensor]) -> set[str]:
    """Module names that hold WINT2 tensors or integer weights with a weight_scale."""
    found = {name.removesuffix(".quant_weight") for name in tensors if name.endswith(".quant_weight")}
    found |= {name.removesuffix(".weight") for name, t in tensors.items()
              if name.endswith(".weight") and not t.is_floating_point()
              and name.removesuffix("weight") + "weight_scale" in tensors}
    return found


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student); logits [B, T, V]."""
    t = F.log_softmax(teacher_logits.float(), dim=-1).flatten(0, 1)
    s = F.log_softmax(student_logits.float(), dim=-1).flatten(0, 1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def _trainable(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
    """(scale and norm parameters, WINT2 code shifts, WINT2 group deltas), all set to require
    grad, the rest frozen."""
    for param in model.parameters():
        param.requires_grad_(False)
    params = [m.delta for m in model.modules() if isinstance(m, ScaledCodeLinear)]
    params += [p for n, p in model.named_parameters() if n.endswith("parametrizations.weight.original")]
    shifts = [m.shift for m in model.modules() if hasattr(m, "shift")]
    groups = [m.group_delta for m in model.modules() if hasattr(m, "group_delta")]
    for param in params + shifts + groups:
        param.requires_grad_(True)
    return params, shifts, groups


@torch.no_grad()
def mean_kl(student: nn.Module, teacher: nn.Module, rows: torch.Tensor) -> float:
    """Mean KL(teacher || student) over `rows` [S, T], one row per forward."""
    losses = [float(kl_loss(student(rows[i:i + 1]).logits, teacher(rows[i:i + 1]).logits))
              for i in range(rows.shape[0])]
    return sum(losses) / max(1, len(losses))


def train(student: nn.Module, teacher: nn.Module, rows: torch.Tensor, heldout: torch.Tensor,
          spec: TuneSpec) -> list[dict]:
    """Adam on the student's deltas; returns per-epoch {epoch, train_kl, heldout_kl}. With held-out
    rows the best epoch's deltas are restored at the end (epoch 0 = untouched)."""
    scales, shifts, group_deltas = _trainable(student)
    params = scales + shifts + group_deltas
    groups = [{"params": scales, "lr": spec.lr}] + ([{"params": shifts, "lr": spec.code_lr}] if shifts else [])
    groups += [{"params": group_deltas, "lr": spec.group_lr}] if group_deltas else []
    opt = torch.optim.Adam(groups)
    steps = spec.epochs * -(-rows.shape[0] // spec.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    history = [{"epoch": 0, "heldout_kl": mean_kl(student, teacher, heldout) if len(heldout) else None}]
    best = (history[0]["heldout_kl"], [p.detach().clone() for p in params])
    for epoch in range(1, spec.epochs + 1):
        order, total = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(epoch)), 0.0
        starts = range(0, rows.shape[0], spec.batch_size)
        for start in tqdm(starts, desc=f"wint2_tune epoch {epoch}/{spec.epochs}", unit="step", leave=False):
            batch = rows[order[start:start + spec.batch_size]]
            with torch.no_grad():
                target = teacher(batch).logits
            loss = kl_loss(student(batch).logits, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * batch.shape[0]
        entry = {"epoch": epoch, "train_kl": total / rows.shape[0],
                 "heldout_kl": mean_kl(student, teacher, heldout) if len(heldout) else None}
        history.append(entry)
        logger.info("wint2_tune epoch %d: train KL %.4f, held-out KL %s", epoch, entry["train_kl"], entry["heldout_kl"])
        if entry["heldout_kl"] is not None and entry["heldout_kl"] < best[0]:
            best = (entry["heldout_kl"], [p.detach().clone() for p in params])
    if len(heldout):
        with torch.no_grad():
            for param, value in zip(params, best[1]):
                param.copy_(value)
    return history


def tuned_tensors(student: nn.Module, replaced: dict[str, tuple[ScaledCodeLinear, str]],
                  tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` with the trained scales and norm weights, each in its original dtype."""
    out = dict(tensors)
    for name, (layer, scale_name) in replaced.items():
        key = f"{name}.{scale_name}"
        out[key] = layer.scale().detach().to(tensors[key].dtype).contiguous()
        if hasattr(layer, "quant_weight"):                 # Wint2CodeLinear: its bytes may have moved
            out[f"{name}.quant_weight"] = layer.quant_weight()
        if hasattr(layer, "group_delta"):                  # Wint2GroupScaleLinear: its nibbles may have moved
            out[f"{name}.weight_scale"] = layer.weight_scale()
    for name, module in student.named_modules():
        key = f"{name}.weight"
        if hasattr(module, "parametrizations") and key in tensors:
            out[key] = module.weight.detach().to(tensors[key].dtype).contiguous()
    return out


def tune_wint2_checkpoint(model_path: str | Path, quant_path: str | Path, save_directory: str | Path,
                          calib: CalibSpec, spec: TuneSpec = TuneSpec(), overwrite: bool = False,
                          tool_report: ToolReport | None = None) -> list[dict]:
    """Tune the WINT2 checkpoint at `quant_path` against the float one at `model_path` (module doc)
    and write it to `save_directory`; returns the per-epoch history. A non-empty `save_directory`
    is refused (CalibError) unless `overwrite`; the output is published atomically with
    `calib_report.json` (`tool_report` completed, or a new one naming this call)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        src = Path(resolve_model_path(str(model_path)))
    except ValueError as exc:
        raise CalibError(f"--model_path: {exc}") from exc
    quant = Path(quant_path)
    shards = sorted(quant.glob("*.safetensors"))
    if len(shards) != 1:
        raise CalibError(f"--quant_path {quant}: expected one model.safetensors from the WINT2 writer, "
                         f"found {len(shards)} safetensors files")
    if Path(save_directory).resolve() in (quant.resolve(), src.resolve()):
        raise CalibError(f"save_directory {save_directory} must differ from model_path and quant_path")
    out = check_output_dir(save_directory, overwrite)
    if tool_report is None:
        tool_report = ToolReport(TOOL, str(model_path), str(save_directory), arguments={
            "quant_path": str(quant_path), "calib": calib, "spec": spec, "overwrite": overwrite})
        _attach_quant_report(tool_report, quant)
    start = time.perf_counter()
    with tool_report.stage("tune"):
        tensors = load_file(str(shards[0]))
        tokenizer = AutoTokenizer.from_pretrained(src)
        rows, heldout = split_calibration_ids(tokenizer, read_calib_texts(calib.calib_file), calib)
        teacher = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        student = copy.deepcopy(teacher)
        replaced = build_student(student, tensors, move_codes=spec.code_lr > 0, move_groups=spec.group_lr > 0)
        history = train(student, teacher, rows, heldout, spec)
    if spec.code_lr > 0:
        moved = sum(layer.num_changed(tensors[f"{name}.quant_weight"]) for name, (layer, _) in replaced.items()
                    if hasattr(layer, "num_changed"))
        total = sum(tensors[f"{name}.quant_weight"].numel() for name, (layer, _) in replaced.items()
                    if hasattr(layer, "num_changed"))
        logger.info("wint2_tune: %d of %d WINT2 bytes changed (%.2f%%)", moved, total, 100 * moved / max(1, total))
        history[-1]["bytes_changed"] = moved
    if spec.group_lr > 0:
        layers = [layer for layer, _ in replaced.values() if hasattr(layer, "group_delta")]
        moved, total = sum(layer.nibbles_changed() for layer in layers), sum(layer.group_delta.numel() for layer in layers)
        logger.info("wint2_tune: %d of %d WINT2 group nibbles changed (%.2f%%)", moved, total, 100 * moved / max(1, total))
        history[-1]["nibbles_changed"] = moved
    tool_report.summary["tune_history"] = history
    with staged_output(out) as staging:
        with tool_report.stage("write"):
            shutil.copytree(quant, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns(shards[0].name))
            save_file(tuned_tensors(student, replaced, tensors), str(staging / shards[0].name),
                      metadata={"format": "pt"})
        # the float answers stay valid; the copied at_conversion described the untuned weights
        tool_report.summary["accuracy_reference"] = carry_over(quant, staging, TOOL)
        tool_report.write_json(staging)
    logger.info("wint2_tune: %d Linears, %d rows x %d epochs in %.0f s", len(replaced), rows.shape[0],
                spec.epochs, time.perf_counter() - start)
    return history


def _attach_quant_report(tool_report: ToolReport, quant: Path) -> None:
    """The input checkpoint's own calib_report.json (if any) as `quant_report`: what wrote it."""
    path = quant / REPORT_FILE
    if path.is_file():
        try:
            tool_report.summary["quant_report"] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            logger.warning("wint2_tune: %s is unreadable; not copied into the report", path)


def main(argv: list[str] | None = None) -> int:
    """CLI entry; returns the exit code: 0 done, 2 bad options or inputs (one error line, no traceback)."""
    parser = argparse.ArgumentParser(prog=f"python -m {TOOL}",
                                     description="distil a WINT2 checkpoint's scales and norms from the float model")
    parser.add_argument("--model_path", required=True, help="the float checkpoint (directory or alias)")
    parser.add_argument("--quant_path", required=True, help="the WINT2 checkpoint written by calib.wint2.writer")
    parser.add_argument("--save_directory", required=True)
    parser.add_argument("--overwrite", action="store_true", help="replace the content of a non-empty --save_directory")
    parser.add_argument("--calib_file", required=True, help="JSON lines, key text / prompt")
    parser.add_argument("--calib_num_samples", type=int, default=32)
    parser.add_argument("--calib_seq_len", type=int, default=512)
    parser.add_argument("--calib_holdout_samples", type=int, default=4,
                        help="rows at the end of the calibration stream that pick the best epoch")
    defaults = TuneSpec()
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--batch_size", type=int, default=defaults.batch_size)
    parser.add_argument("--code_lr", type=float, default=defaults.code_lr,
                        help="> 0: the WINT2 bytes train too (straight-through rounding), Adam step in "
                             "window units (e.g. 0.02); 0 keeps the codes")
    parser.add_argument("--group_lr", type=float, default=defaults.group_lr,
                        help="> 0: the WINT2 4-bit group scales (nibbles) train too (straight-through "
                             "rounding), relative Adam step (e.g. 3e-3); 0 keeps them")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        calib = CalibSpec(args.calib_file, args.calib_num_samples, args.calib_seq_len,
                          holdout_samples=args.calib_holdout_samples)
        spec = TuneSpec(args.epochs, args.lr, args.batch_size, args.code_lr, args.group_lr)
    except ValueError as exc:
        parser.error(str(exc))
    report = ToolReport(TOOL, args.model_path, args.save_directory, arguments=vars(args))
    _attach_quant_report(report, Path(args.quant_path))
    try:
        history = tune_wint2_checkpoint(args.model_path, args.quant_path, args.save_directory, calib, spec,
                                        overwrite=args.overwrite, tool_report=report)
    except (CalibError, ValueError, OSError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    for entry in history:
        logger.info("epoch %d: train KL %s, held-out KL %s", entry["epoch"], entry.get("train_kl"), entry["heldout_kl"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
