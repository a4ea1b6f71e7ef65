"""Calibration options: one dataclass, recipe (YAML) loading and validation.

Option names follow msModelSlim's `example/Llama/quant_llama.py` so existing conversion scripts
keep working. Precedence: dataclass defaults < recipe values < command-line flags.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

RECIPES_DIR = Path(__file__).parent / "recipes"
ACT_METHODS = {1: "minmax", 2: "histogram", 3: "auto"}
ANTI_METHODS = ("m1", "m2", "m3", "m4", "m5", "m6")
DEVICE_TYPES = ("cpu", "cuda", "npu")
# msModelSlim's weight rounding methods (QuantConfig w_method): MinMax and GPTQ are implemented
W_METHODS = {"minmax": "minmax", "gptq": "gptq"}
UNSUPPORTED_W_METHODS = {"hqq": "HQQ (half-quadratic weight optimisation) is not implemented here"}
SAVE_FORMATS = ("ascendv1", "compressed-tensors")
ROTATIONS = ("hadamard",)        # online Hadamard before every mlp.down_proj (calib/rotation.py)
_DISABLE_LEVEL = re.compile(r"^L(\d+)$")


class CalibError(ValueError):
    """A problem with the user's options or inputs (the CLI prints it and exits with code 2)."""


@dataclass
class CalibConfig:
    """Every option of one calibration run (msModelSlim names where msModelSlim has one)."""

    model_path: str = ""
    save_directory: str = ""
    calib_file: str = ""
    device_type: str = "cpu"
    w_bit: int = 8
    a_bit: int = 8
    w_method: str = "MinMax"         # weight rounding: MinMax (nearest) | GPTQ (int8 and weight-only runs)
    group_size: int = 0              # weight-only: input columns per scale; 0 = per channel
    w_sym: bool = True               # weight-only: False adds integer zero points (weight_offset)
    save_format: str = "ascendv1"    # weight-only runs may write compressed-tensors instead
    act_method: int = 1
    anti_method: str | None = None
    disable_level: str = "L0"
    disable_names: list[str] = field(default_factory=list)
    dynamic_names: list[str] = field(default_factory=list)   # W8A8 runs: these Linears W8A8_DYNAMIC
    rotation: str | None = None      # "hadamard": smoothed + online-rotated down_proj inputs
    hadamard_block_size: int = 0     # 0 = the largest power of two dividing intermediate_size (<= 512)
    speed_aware: str | None = None   # `inspect --bench --bench-output` JSON, or auto: slower layers stay float
    speed_aware_batch: int = 1       # the batch size (rows) whose timings decide
    is_dynamic: bool = False
    use_kvcache_quant: bool = False
    kv_asymmetric: bool = False      # C8 with kv_cache_offset (vllm-ascend ignores the offset)
    mixed_format: bool = False
    num_samples: int = 16            # calibration texts used (CPU time grows linearly)
    max_tokens: int = 128            # tokens per calibration text
    sample_tokens: int = 256         # input rows kept per Linear for error scoring
    part_file_size: float = 0.0      # GB per weight shard; 0 = one file
    seed: int = 0
    overwrite: bool = False          # replace a non-empty save_directory
    progress: bool = True            # tqdm bars on stderr
    recipe: str | None = None

    @property
    def num_float_layers(self) -> int:
        """k of `disable_level` 'Lk'."""
        return int(_DISABLE_LEVEL.match(self.disable_level).group(1))

    @property
    def act_method_name(self) -> str:
        return ACT_METHODS[self.act_method]

    @property
    def w_method_name(self) -> str:
        """minmax | gptq (msModelSlim spells them MinMax / GPTQ; any case is accepted)."""
        return W_METHODS.get(str(self.w_method).lower(), str(self.w_method))

    @property
    def weight_only_calibration(self) -> bool:
        """Handled by calib/weight_only.py: int4 weights, GPTQ, groups, zero points or
        compressed-tensors output (plain per-channel MinMax W8A16 stays in the W8A8 pipeline)."""
        return self.a_bit == 16 and (self.w_bit == 4 or self.w_method_name == "gptq" or self.group_size > 0
                                     or not self.w_sym or self.save_format != "ascendv1")

    @property
    def linear_quant_type(self) -> str:
        """The description type of a quantized Linear (before MoFQ's per-layer choice)."""
        if self.a_bit == 16:
            return "W8A16"
        return "W8A8_DYNAMIC" if self.is_dynamic or self.mixed_format else "W8A8"

    def validate(self) -> "CalibConfig":
        """Raise CalibError naming the first bad option; returns self."""
        _require(bool(self.model_path), "--model_path is required")
        _require(bool(self.save_directory), "--save_directory is required")
        _require(bool(self.calib_file), "--calib_file is required")
        _require(self.w_bit in (4, 8), f"--w_bit: 4 or 8 expected, got {self.w_bit}")
        _require(self.a_bit in (8, 16), f"--a_bit: 8 or 16 expected, got {self.a_bit}")
        _require(not (self.w_bit == 4 and self.a_bit != 16),
                 f"--w_bit 4 --a_bit {self.a_bit}: 4-bit weights are weight-only here (W4A16); "
                 f"pass --a_bit 16 (W4A8 is not supported)")
        method = str(self.w_method).lower()
        _require(method not in UNSUPPORTED_W_METHODS,
                 f"--w_method {self.w_method}: {UNSUPPORTED_W_METHODS.get(method)}; use MinMax or GPTQ")
        _require(method in W_METHODS, f"--w_method: unknown method {self.w_method!r}; expected MinMax or GPTQ")
        _require(self.save_format in SAVE_FORMATS,
                 f"--save_format: expected one of {', '.join(SAVE_FORMATS)}, got {self.save_format!r}")
        _require(isinstance(self.group_size, int) and self.group_size >= 0,
                 f"--group_size: must be 0 (per channel) or a positive number of input columns, "
                 f"got {self.group_size!r}")
        weight_only_opts = [opt for opt, used in (
            (f"--group_size {self.group_size}", self.group_size > 0),
            ("--w_sym false", not self.w_sym), (f"--save_format {self.save_format}", self.save_format != "ascendv1"))
            if used]
        _require(not (method == "gptq" and self.a_bit == 8 and self.mixed_format),
                 "--w_method GPTQ with --mixed_format: not implemented (FP8 layers); GPTQ rounds int8 weights")
        _require(self.a_bit == 16 or not weight_only_opts,
                 f"{', '.join(weight_only_opts)}: implemented for weight-only calibration; pass --a_bit 16")
        if self.weight_only_calibration:
            _require(self.disable_level == "L0", f"--disable_level {self.disable_level}: weight-only "
                     f"calibration keeps Linears float by --disable_names only")
            _require(not self.use_kvcache_quant, "--use_kvcache_quant: not written by weight-only "
                     "calibration (int4 / GPTQ / groups)")
        _require(self.rotation is None or self.rotation in ROTATIONS,
                 f"--rotation: unknown rotation {self.rotation!r}; expected one of {', '.join(ROTATIONS)}")
        _require(self.rotation is None or self.a_bit == 8,
                 f"--rotation {self.rotation}: implemented for int8 activations (W8A8 / W8A8_DYNAMIC); "
                 f"weight-only runs do not quantize down_proj's input")
        _require(self.rotation is None or not self.mixed_format,
                 f"--rotation {self.rotation} with --mixed_format: not implemented (FP8 layers)")
        _require(isinstance(self.hadamard_block_size, int) and self.hadamard_block_size >= 0,
                 f"--hadamard_block_size: a power of two (0 = automatic), got {self.hadamard_block_size!r}")
        _require(not self.hadamard_block_size or self.rotation is not None,
                 "--hadamard_block_size sets the block of --rotation hadamard; pass --rotation hadamard")
        _require(not self.dynamic_names or (self.a_bit == 8 and not self.is_dynamic and not self.mixed_format),
                 "--dynamic_names: makes some Linears W8A8_DYNAMIC in a static W8A8 run (--a_bit 8, "
                 "without --is_dynamic / --mixed_format)")
        _require(not (self.speed_aware and self.weight_only_calibration),
                 "--speed_aware: implemented for W8A8 / W8A8_DYNAMIC / per-channel W8A16 calibration; "
                 "weight-only calibration (int4 / GPTQ / groups) keeps Linears float by --disable_names only")
        _require(isinstance(self.speed_aware_batch, int) and self.speed_aware_batch >= 1,
                 f"--speed_aware_batch: must be >= 1, got {self.speed_aware_batch!r}")
        _require(not self.kv_asymmetric or self.use_kvcache_quant,
                 "--kv_asymmetric shapes the C8 KV-cache scales; it needs --use_kvcache_quant")
        _require(self.act_method in ACT_METHODS,
                 f"--act_method: unknown value {self.act_method!r}; expected 1 (min-max), "
                 f"2 (histogram) or 3 (auto)")
        _require(self.anti_method is None or self.anti_method in ANTI_METHODS,
                 f"--anti_method: unknown method {self.anti_method!r}; expected one of "
                 f"{', '.join(ANTI_METHODS)}")
        _require(isinstance(self.disable_level, str) and bool(_DISABLE_LEVEL.match(self.disable_level)),
                 f"--disable_level: expected L0, L1, ... Ln, got {self.disable_level!r}")
        _require(self.device_type in DEVICE_TYPES,
                 f"--device_type: expected one of {', '.join(DEVICE_TYPES)}, got {self.device_type!r}")
        _require(not (self.a_bit == 16 and (self.is_dynamic or self.mixed_format)),
                 "--is_dynamic / --mixed_format quantize activations; they need --a_bit 8")
        _require(self.num_samples >= 1, f"--num_samples: must be >= 1, got {self.num_samples}")
        _require(self.max_tokens >= 2, f"--max_tokens: must be >= 2, got {self.max_tokens}")
        _require(self.sample_tokens >= 1, f"--sample_tokens: must be >= 1, got {self.sample_tokens}")
        _require(self.part_file_size >= 0, f"--part_file_size: must be >= 0, got {self.part_file_size}")
        return self


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise CalibError(message)


def resolve_recipe(name_or_path: str, recipes_dir: Path = RECIPES_DIR) -> Path:
    """A recipe file path, or the name of a bundled recipe in `recipes_dir` (calib/recipes/ for
    `python -m calib`; with or without .yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (recipes_dir / name_or_path, recipes_dir / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate
    bundled = ", ".join(sorted(p.stem for p in recipes_dir.glob("*.yaml")))
    raise CalibError(f"--recipe: {name_or_path!r} is neither a file nor a bundled recipe "
                     f"(bundled: {bundled})")


def load_recipe(name_or_path: str, known: Iterable[str] | None = None,
                recipes_dir: Path = RECIPES_DIR) -> dict[str, Any]:
    """The option values of a recipe; CalibError for unreadable YAML or unknown keys. `known`:
    the option names a recipe may set (default: CalibConfig's, for `python -m calib`)."""
    path = resolve_recipe(name_or_path, recipes_dir)
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise CalibError(f"recipe {path}: unreadable YAML: {exc}") from exc
    if not isinstance(values, dict):
        raise CalibError(f"recipe {path}: expected a mapping of option names to values")
    if known is None:
        known = {f.name for f in dataclasses.fields(CalibConfig)}
    known = set(known) - {"recipe"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise CalibError(f"recipe {path}: unknown option(s) {unknown}; known: {sorted(known)}")
    return values


def build_config(cli_values: dict[str, Any]) -> CalibConfig:
    """Merge defaults, the recipe named in `cli_values['recipe']` (if any) and explicit CLI values.

    `cli_values` holds only the options the user set (None / absent = not given).
    """
    merged = merge_recipe(cli_values)
    for key in ("disable_names", "dynamic_names"):
        if key in merged and isinstance(merged[key], str):
            merged[key] = merged[key].split()
    return CalibConfig(**merged).validate()


def merge_recipe(cli_values: dict[str, Any], known: Iterable[str] | None = None,
                 recipes_dir: Path = RECIPES_DIR) -> dict[str, Any]:
    """The recipe named in `cli_values['recipe']` (if any; `known` / `recipes_dir` as in
    `load_recipe`) updated by the explicit CLI values (None / absent = not given): flags win."""
    given = {k: v for k, v in cli_values.items() if v is not None}
    merged: dict[str, Any] = {}
    if given.get("recipe"):
        merged.update(load_recipe(given["recipe"], known, recipes_dir))
    merged.update(given)
    return merged
