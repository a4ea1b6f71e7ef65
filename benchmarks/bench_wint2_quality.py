"""WINT2 quality table: float / RTN 2-bit / WINT2 writers, on tiny MoE models and on SmolLM2.

Part 1, tiny MoE models (tests/tiny_models.tiny_moe_config: 3 layers, 8 experts, top-2, random
weights): the routed experts' weights are replaced by their round trip through
  wint4 (per-channel symmetric int4, FastDeploy's w4 experts), RTN 2-bit (min/max per group 64),
  WINT2 plain (calib/wint2/encode.encode_wint2), WINT2 GPTQ (calib/wint2/gptq + refine with per-expert
  Hessians of the tokens routed to each expert, one float calibration pass)
and the relative logits error ||logits_q - logits_f|| / ||logits_f|| is measured on held-out
random tokens (calibration on other random tokens). Shared experts / dense layers stay float.

Part 2, SmolLM2-135M-Instruct (unless --skip_smollm2): perplexity of eval_tempest.txt (first
--eval_tokens tokens, --window-token windows) for float, RTN 2-bit on the MLP (a float checkpoint
holding the round-tripped weights, attention float), and the WINT2 writer (MLP WINT2, attention
wint8) with --methods (plain / search / gptq, and the GPTQ_VARIANTS below; "<row>+tune" is that
row's checkpoint after calib/wint2/tune.py's distillation of scales and norms, "<row>+tune_groups"
the same with the WINT2 group nibbles trained too). Checkpoints go to
--workdir and are reused if present (a SmolLM2 gptq conversion takes ~10 minutes on one core).
Each row also gets the perplexity of calib_prose.jsonl split into --window rows: the first 8
calibration rows ("calib", seen by the writer) and the last --holdout rows ("held out", never
used for calibration: every calibrated row is written with holdout_samples = --holdout).

Writes benchmarks/results/wint2_quality_<date>_<cpu>.json, or --output (rewritten after each row).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))                       # tests.tiny_models

from ascend_llm.numerics import primitives as P  # noqa: E402
from calib.wint2 import encode as E  # noqa: E402
from calib.wint2 import gptq as G  # noqa: E402
from calib.wint2.refine import refine_wint2  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
# GPTQ writer variants: (EncoderOptions fields, calibration rows or None for --calib_samples,
# dense_wint2_modules or None for the default MLP set, dense_wint4_modules). Layers 0 and 29 are
# SmolLM2-135M's first and last; "ends_w4" writes their down_proj wint4 instead of WINT2.
ALL_MLP_BUT_END_DOWN = ("mlp.gate_proj", "mlp.up_proj", r"re:model\.layers\.(?!0\.|29\.)\d+\.mlp\.down_proj$")
END_DOWN = (r"re:model\.layers\.(0|29)\.mlp\.down_proj$",)
AO_CS3 = {"act_orders": ("none", "group"), "code_scales": E.CODE_SCALE_CANDIDATES}   # the writer's default
ONE = {"act_orders": ("none",), "code_scales": E.DEFAULT_CODE_SCALES}                 # the GPTQ writer before
GPTQ_VARIANTS: dict[str, tuple[dict, int | None, tuple[str, ...] | None, tuple[str, ...]]] = {
    "gptq": (ONE, None, None, ()),
    "gptq_ao": ({**ONE, "act_orders": ("none", "group")}, None, None, ()),
    "gptq_cs3": ({**ONE, "code_scales": E.CODE_SCALE_CANDIDATES}, None, None, ()),
    "gptq_ao_cs3": (AO_CS3, None, None, ()),
    "gptq_64": (ONE, 64, None, ()),
    "gptq_ao_cs3_64": (AO_CS3, 64, None, ()),
    "gptq_ao_cs3_64_ends_w4": (AO_CS3, 64, ALL_MLP_BUT_END_DOWN, END_DOWN),
}
RESULTS = ROOT / "benchmarks" / "results"
CONVERT_TIMES = "bench_convert_times.json"     # written next to each converted checkpoint
TUNE_HISTORY = "bench_tune_history.json"       # per-epoch KL of a tuned row, next to its checkpoint
TUNED = "+tune"     # row suffix: the row's checkpoint after distillation tuning (calib/wint2/tune.py)
TUNED_GROUPS = "+tune_groups"   # the same with the WINT2 group nibbles trained too (--tune_group_lr)
MOE_ARCHS = ("qwen3_moe", "qwen2_moe", "ernie4_5_moe")
logger = logging.getLogger("bench_wint2_quality")


# ---------------------------------------------------------------- part 1: tiny MoE output error

def _tiny_moe(arch: str, seed: int = 0) -> torch.nn.Module:
    from tests.tiny_models import tiny_moe_config
    torch.manual_seed(seed)
    config, cls = tiny_moe_config(arch)
    model = cls(config).eval()
    with torch.no_grad():   # the tests' larger-than-default init
        for p in model.parameters():
            p.normal_(0, 0.08) if p.dim() >= 2 else p.uniform_(0.8, 1.2)
    return model


def _experts(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "gate_up_proj") and isinstance(m.gate_up_proj, torch.nn.Parameter)
            and m.gate_up_proj.dim() == 3]


def _routed_inputs(model: torch.nn.Module, ids: torch.Tensor) -> dict[int, list[torch.Tensor]]:
    """{experts module index: per expert its routed input rows [t_e, H]} from one float pass."""
    experts = _experts(model)
    seen: dict[int, list[torch.Tensor]] = {}

    def hook(index: int):
        def record(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]                       # [T, H]
            top_k = args[1] if len(args) > 1 else kwargs["top_k_index"]                 # [T, top_k]
            seen[index] = [hidden[(top_k == e).any(-1)] for e in range(module.gate_up_proj.shape[0])]
        return record

    handles = [m.register_forward_pre_hook(hook(i), with_kwargs=True) for i, m in enumerate(experts)]
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    return seen


def _round_trip(method: str, w: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
    """[n, k] weight -> its dequantized [n, k] through `method` (x [t, k]: calibration inputs)."""
    if method == "wint4":
        q, scale = P.quantize_per_channel(w, 4)
        return P.dequantize_per_channel(q, scale)
    if method == "rtn2":
        return E.rtn_int2_group(w)
    if method == "wint2_plain":
        return G.dequantize(E.encode_wint2(w))
    h = x.t() @ x if x is not None and x.shape[0] else torch.eye(w.shape[1])
    encoded = G.encode_wint2_hessian(w, h).tensors
    return G.dequantize(refine_wint2(w, h, encoded).tensors)


def moe_output_errors(arch: str, methods: tuple[str, ...]) -> dict[str, float]:
    """{method: relative logits error} for one tiny MoE architecture (module doc)."""
    g = torch.Generator().manual_seed(1)
    model = _tiny_moe(arch)
    vocab = model.config.vocab_size
    calib, held_out = torch.randint(3, vocab, (8, 64), generator=g), torch.randint(3, vocab, (4, 64), generator=g)
    with torch.no_grad():
        ref = model(held_out).logits
    originals = [(m.gate_up_proj.data.clone(), m.down_proj.data.clone()) for m in _experts(model)]
    inputs = _routed_inputs(model, calib)
    errors = {}
    for method in methods:
        for index, (module, (gate_up, down)) in enumerate(zip(_experts(model), originals)):
            for e in range(gate_up.shape[0]):
                x = inputs[index][e]                                                      # [t_e, H]
                new_gate_up = _round_trip(method, gate_up[e], x)
                gate, up = F.linear(x, new_gate_up).chunk(2, dim=-1)
                module.gate_up_proj.data[e] = new_gate_up
                module.down_proj.data[e] = _round_trip(method, down[e], module.act_fn(gate) * up)
        with torch.no_grad():
            errors[method] = float((model(held_out).logits - ref).norm() / ref.norm())
    return errors


# ---------------------------------------------------------------- part 2: SmolLM2 perplexity

def _rtn_checkpoint(src: Path, out: Path) -> None:
    """Float checkpoint with every mlp.*_proj weight replaced by its RTN 2-bit round trip."""
    import shutil

    from safetensors.torch import load_file, save_file
    out.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(src / "model.safetensors"))
    for name, t in tensors.items():
        if ".mlp." in name and name.endswith("_proj.weight"):
            tensors[name] = E.rtn_int2_group(t).to(t.dtype).contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for path in src.iterdir():
        if path.is_file() and path.suffix != ".safetensors":
            shutil.copy2(path, out / path.name)


def _build(method: str, src: Path, out: Path, args: argparse.Namespace) -> dict[str, float]:
    """Write the checkpoint of a row unless `out` holds one; {"wall_s", "cpu_s"} spent (read back
    from out/CONVERT_TIMES when reused, {} if that is missing). CPU seconds are this process's
    user + system time: on a shared machine whose jobs get paused, wall time overstates."""
    times = out / CONVERT_TIMES
    if (out / "config.json").exists():
        return json.loads(times.read_text()) if times.exists() else {}
    wall, cpu = time.perf_counter(), time.process_time()
    _write(method, src, out, args)
    result = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
    times.write_text(json.dumps(result) + "\n")
    return result


def _write(method: str, src: Path, out: Path, args: argparse.Namespace) -> None:
    """The checkpoint of row `method` (rtn2, plain, search, gptq or a GPTQ_VARIANTS name)."""
    from calib.wint2.calibration import CalibSpec
    from calib.wint2.gptq_writer import EncoderOptions
    from calib.wint2.writer import DEFAULT_WINT2_MODULES, write_wint2_checkpoint
    if method.endswith(TUNED_GROUPS):
        _tune(method.removesuffix(TUNED_GROUPS), src, out, args, group_lr=args.tune_group_lr)
    elif method.endswith(TUNED):
        _tune(method.removesuffix(TUNED), src, out, args)
    elif method == "rtn2":
        _rtn_checkpoint(src, out)
    elif method == "plain":
        write_wint2_checkpoint(src, out)
    else:
        if method != "search" and method not in GPTQ_VARIANTS:
            raise ValueError(f"--methods: {method!r} is not plain, search or one of {list(GPTQ_VARIANTS)}")
        fields, samples, modules, wint4 = GPTQ_VARIANTS.get(method, (ONE, None, None, ()))
        calib = CalibSpec(args.calib_file, samples or args.calib_samples, args.calib_seq_len,
                          holdout_samples=args.holdout)
        options = EncoderOptions("search" if method == "search" else "gptq", **fields)
        write_wint2_checkpoint(src, out, modules or DEFAULT_WINT2_MODULES, method=options.method,
                               calib=calib, encoder_options=options, dense_wint4_modules=wint4)


def _tune(base: str, src: Path, out: Path, args: argparse.Namespace, group_lr: float = 0.0) -> None:
    """Row "<base>+tune": the row `base` (built first if missing) after calib/wint2/tune.py
    (--tune_samples rows of --tune_calib_file or --calib_file, --tune_epochs, --tune_lr; the --holdout
    rows at the end of that stream pick the epoch); "<base>+tune_groups" also trains the nibbles."""
    from calib.wint2.calibration import CalibSpec
    from calib.wint2.tune import TuneSpec, tune_wint2_checkpoint
    base_dir = Path(args.workdir) / base
    _build(base, src, base_dir, args)
    calib = CalibSpec(args.tune_calib_file or args.calib_file, args.tune_samples, args.calib_seq_len,
                      holdout_samples=args.holdout)
    history = tune_wint2_checkpoint(src, base_dir, out, calib,
                                    TuneSpec(args.tune_epochs, args.tune_lr, group_lr=group_lr))
    (out / TUNE_HISTORY).write_text(json.dumps(history) + "\n")


def calib_split_ids(tokenizer, args: argparse.Namespace) -> tuple[list[int], list[int]]:
    """(first 8 calibration rows, last --holdout rows) of calib_prose.jsonl, flattened."""
    from calib.texts import read_calib_texts
    from calib.wint2.calibration import CalibSpec, split_calibration_ids
    spec = CalibSpec(args.calib_file, 8, args.window, holdout_samples=args.holdout)
    calib, held = split_calibration_ids(tokenizer, read_calib_texts(args.calib_file), spec)
    return calib.reshape(-1).tolist(), held.reshape(-1).tolist()


def smollm2_perplexity(model_dir: Path, args: argparse.Namespace) -> dict[str, float]:
    """{"eval": eval_tempest, "calib": first 8 calibration rows, "held_out": held-out rows}."""
    from ascend_llm import LLM
    from ascend_llm.eval.perplexity import perplexity
    llm = LLM(str(model_dir), max_model_len=args.window + 1)
    text = (SHARED / "eval_tempest.txt").read_text(encoding="utf-8")
    ids = llm.get_tokenizer().encode(text, add_special_tokens=False)[:args.eval_tokens]
    calib, held = calib_split_ids(llm.get_tokenizer(), args)
    return {"eval": perplexity(llm, ids, args.window).perplexity,
            "calib": perplexity(llm, calib, args.window).perplexity,
            "held_out": perplexity(llm, held, args.window).perplexity}


# ---------------------------------------------------------------- driver

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval_tokens", type=int, default=16384)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--methods", nargs="*", default=["plain", "search", "gptq"],
                        help=f"plain, search, gptq or a GPTQ variant: {', '.join(GPTQ_VARIANTS)}; "
                             f"any of them + '{TUNED}' for its distillation-tuned checkpoint")
    parser.add_argument("--calib_file", default=str(SHARED / "calib_prose.jsonl"))
    parser.add_argument("--calib_samples", type=int, default=32)
    parser.add_argument("--calib_seq_len", type=int, default=512)
    parser.add_argument("--holdout", type=int, default=8, help="held-out calibration rows (never calibrated on)")
    parser.add_argument("--tune_samples", type=int, default=32, help="calibration rows of '+tune' rows")
    parser.add_argument("--tune_calib_file", default=None,
                        help="calibration texts of '+tune' rows (default --calib_file), e.g. a calib.mix of "
                             "calib.synthetic texts with calib_prose.jsonl")
    parser.add_argument("--tune_epochs", type=int, default=3)
    parser.add_argument("--tune_lr", type=float, default=3e-3)
    parser.add_argument("--tune_group_lr", type=float, default=1e-2, help="group nibble step of '+tune_groups' rows")
    parser.add_argument("--workdir", default="/tmp/bench_wint2_quality")
    parser.add_argument("--skip_smollm2", action="store_true")
    parser.add_argument("--moe_archs", nargs="*", default=list(MOE_ARCHS))
    parser.add_argument("--extra", nargs="*", default=[], metavar="LABEL=DIR",
                        help="more rows: already written checkpoints (e.g. other calibration settings)")
    parser.add_argument("--output", default=None,
                        help="JSON path (default benchmarks/results/wint2_quality_<date>_<cpu>.json, "
                             "which a later run on the same day and CPU overwrites)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    from bench_offline import cpu_model_name, machine_slug     # benchmarks/ is on sys.path
    machine = cpu_model_name()
    path = Path(args.output) if args.output else \
        RESULTS / f"wint2_quality_{dt.date.today().isoformat()}_{machine_slug(machine)}.json"
    report: dict = {"date": dt.datetime.now(dt.timezone.utc).isoformat(), "machine": machine,
                    "torch_threads": torch.get_num_threads(), "args": vars(args), "moe": {}, "smollm2": []}
    moe_methods = ("wint4", "rtn2", "wint2_plain", "wint2_gptq")
    print(f"{'tiny MoE (relative logits error)':34s}" + "".join(f"{m:>12s}" for m in moe_methods))
    for arch in args.moe_archs:
        report["moe"][arch] = moe_output_errors(arch, moe_methods)
        print(f"{arch:34s}" + "".join(f"{report['moe'][arch][m]:12.4f}" for m in moe_methods))
        path.write_text(json.dumps(report, indent=2) + "\n")
    if args.skip_smollm2:
        return
    from ascend_llm.loader.resolve import resolve_model_path
    src = Path(resolve_model_path("smollm2-135m-instruct"))
    print(f"\nSmolLM2-135M eval_tempest.txt, {args.eval_tokens} tokens, window {args.window}")
    extra = dict(item.split("=", 1) for item in args.extra)
    for row in ["float", "rtn2"] + list(args.methods) + list(extra):
        out = src if row == "float" else Path(extra.get(row, Path(args.workdir) / row))
        times = {} if row == "float" else _build(row, src, out, args) if row not in extra else \
            (json.loads((out / CONVERT_TIMES).read_text()) if (out / CONVERT_TIMES).exists() else {})
        ppl = smollm2_perplexity(out, args)
        float_ppl = report["smollm2"][0]["perplexity"] if report["smollm2"] else ppl["eval"]   # row 0: float
        report["smollm2"].append({"row": row, "perplexity": ppl["eval"], "ratio_to_float": ppl["eval"] / float_ppl,
                                  "calib_ppl": ppl["calib"], "held_out_ppl": ppl["held_out"],
                                  "convert_s": times.get("wall_s", 0.0), "convert_cpu_s": times.get("cpu_s", 0.0),
                                  "dir": str(out)})
        if (out / TUNE_HISTORY).exists():
            report["smollm2"][-1]["tune_history"] = json.loads((out / TUNE_HISTORY).read_text())
        print(f"  {row:24s} perplexity {ppl['eval']:10.2f} ({ppl['eval'] / float_ppl:6.2f}x float)  calib {ppl['calib']:8.2f}  held out "
              f"{ppl['held_out']:8.2f}" + (f"  (converted: {times['cpu_s']:.0f} s CPU)" if times else ""))
        path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
