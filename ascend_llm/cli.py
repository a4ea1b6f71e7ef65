"""`ascend-llm generate | chat | serve | eval | inspect | verify | convert`."""
from __future__ import annotations

import argparse
import importlib.util
import logging
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from ascend_llm.engine.arg_utils import EngineArgs

logger = logging.getLogger("ascend_llm")


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--max-tokens", type=int, default=128)
    add("--temperature", type=float, default=0.0)
    add("--top-p", type=float, default=1.0)
    add("--top-k", type=int, default=0)
    add("--min-p", type=float, default=0.0)
    add("--repetition-penalty", type=float, default=1.0)
    add("--sampling-seed", dest="sampling_seed", type=int, default=None, help="per-request sampling seed")
    add("--stop", action="append", default=None, help="stop string (repeatable)")


def _sampling_params(args: argparse.Namespace):
    from ascend_llm.sampling_params import SamplingParams
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.sampling_seed, stop=args.stop)


def _make_llm(args: argparse.Namespace):
    from ascend_llm.llm import LLM
    engine_args = EngineArgs.from_cli_args(args)
    kwargs = {k: v for k, v in vars(engine_args).items() if k != "model"}
    return LLM(engine_args.model, **kwargs)


def cmd_generate(args: argparse.Namespace) -> int:
    llm = _make_llm(args)
    params = _sampling_params(args)
    outputs = llm.generate(args.prompt, params, use_tqdm=False)
    for out in outputs:
        sys.stdout.write(out.outputs[0].text + "\n")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    llm = _make_llm(args)
    params = _sampling_params(args)
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    turns = args.message or []
    interactive = not turns
    while True:
        if interactive:
            try:
                user = input("user> ")
            except EOFError:
                return 0
            if user.strip() in ("/exit", "/quit"):
                return 0
        elif turns:
            user = turns.pop(0)
        else:
            return 0
        messages.append({"role": "user", "content": user})
        reply = llm.chat(messages, params, use_tqdm=False)[0].outputs[0].text
        messages.append({"role": "assistant", "content": reply})
        sys.stdout.write(("assistant> " if interactive else "") + reply + "\n")
        sys.stdout.flush()


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ascend_llm.eval.perplexity import perplexity
    try:
        text = Path(args.file).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"file: cannot read {args.file!r}: {exc}") from exc
    if args.max_model_len is None:
        args.max_model_len = args.window + 1   # room for the one generated token
    llm = _make_llm(args)
    token_ids = llm.get_tokenizer().encode(text, add_special_tokens=False)[:args.max_tokens]
    result = perplexity(llm, token_ids, args.window)
    sys.stdout.write(f"scored {result.num_scored} tokens in {result.num_windows} windows of "
                     f"{args.window}; perplexity {result.perplexity:.4f}\n")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Load the model (no server) and print its per-layer quantization audit."""
    import json
    from ascend_llm.quant.audit import audit_report, summary_line, table
    if args.model_path:
        args.model = args.model_path
    if args.kv_cache_memory_gb is None:
        args.kv_cache_memory_gb = 0.05          # the audit needs the model, not a serving-size cache
    args.enforce_eager = True
    if args.bench_output and not Path(args.bench_output).parent.is_dir():
        raise ValueError(f"--bench-output {args.bench_output}: the directory does not exist")
    engine = _make_llm(args).llm_engine
    audits = engine.quantization_audit()
    bench = engine.kernel_bench(tuple(args.bench_batch_sizes)) if args.bench or args.bench_output else None
    bench_dict = None if bench is None else {**bench.to_dict(), "host": _bench_host(args.bench_note)}
    report = audit_report(audits, engine.backend, bench_dict)
    if args.bench_output:
        try:
            Path(args.bench_output).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"--bench-output {args.bench_output}: cannot write ({exc.strerror or exc})") from exc
        logger.info("wrote the audit and kernel timings to %s", args.bench_output)
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return 0
    sys.stdout.write(table(audits) + "\n\n" + f"{engine.backend}: {summary_line(audits)}\n")
    if bench is not None:
        sys.stdout.write("\n" + bench.table() + "\n")
    return 0


def _bench_host(note: str | None) -> dict[str, object]:
    """Where `inspect --bench` measured: CPU model and count, torch threads and version, time, the
    user's note."""
    import os
    import time

    import torch

    from ascend_llm.ops.cpu_features import cpuinfo_text, parse_cpuinfo_field
    return {"cpu": parse_cpuinfo_field(cpuinfo_text(), "model name"), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "note": note}


def _batch_sizes(value: str) -> list[int]:
    """'1,16' -> [1, 16]; argparse reports anything else as a bad --bench-batch-sizes."""
    try:
        sizes = [int(part) for part in value.split(",")]
    except ValueError:
        sizes = []
    if not sizes or any(size < 1 for size in sizes) or len(set(sizes)) != len(sizes):
        raise argparse.ArgumentTypeError(f"expected distinct positive integers separated by commas, got {value!r}")
    return sizes


def cmd_verify(args: argparse.Namespace) -> int:
    """Replay the checkpoint's accuracy reference (or one built from --reference FLOAT_MODEL);
    0 within the thresholds, 1 past them, 2 on bad input."""
    import json
    from ascend_llm.eval.accuracy_guard import generic_prompts, reference_from_engine, verify
    from ascend_llm.eval.accuracy_reference import AccuracyReferenceError, load_reference
    from ascend_llm.loader import resolve_model_path
    args.model = args.model_path or args.model
    args.enforce_eager = True
    try:
        if args.reference:
            float_engine = _make_llm(argparse.Namespace(**{**vars(args), "model": args.reference})).llm_engine
            reference = reference_from_engine(float_engine, generic_prompts(float_engine.tokenizer, vocab_size=float_engine.vocab_size), 8,
                                              {"tool": "ascend-llm verify --reference"}, args.reference)
            float_engine.shutdown()
            args.tokenizer = args.tokenizer or args.reference    # replay needs ids only; peers may ship none
        else:
            reference = load_reference(resolve_model_path(args.model))
        report = verify(_make_llm(args).llm_engine, reference, args.max_kl, args.min_top1)
    except AccuracyReferenceError as exc:
        logger.error("verify: %s", exc)
        return 2
    sys.stdout.write((json.dumps(report.to_dict(), indent=2) if args.json else report.text()) + "\n")
    return 0 if report.ok else 1


def cmd_serve(args: argparse.Namespace) -> int:
    from ascend_llm.server.api_server import run_server
    return run_server(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ascend-llm", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = EngineArgs.add_cli_args(sub.add_parser("generate", help="complete prompts and print the text"))
    gen.add_argument("--prompt", action="append", required=True, help="prompt (repeatable)")
    _add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)
    chat = EngineArgs.add_cli_args(sub.add_parser("chat", help="chat with the model's chat template"))
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--message", action="append", default=None,
                      help="user turn(s) to send non-interactively (repeatable)")
    _add_sampling_args(chat)
    chat.set_defaults(func=cmd_chat)
    _add_serve_parser(sub)
    _add_eval_parser(sub)
    inspect = EngineArgs.add_cli_args(sub.add_parser(
        "inspect", help="load a model and print, per layer, its quantization scheme, the kernel "
                        "chosen on this backend, the weight layout and bytes"))
    inspect.add_argument("model_path", nargs="?", default=None, help="model (same as --model)")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect.add_argument("--bench", action="store_true",
                         help="time each distinct layer shape with its chosen kernel against the float kernel "
                              "and print the expected decode speed-up, flagging layers slower than float")
    inspect.add_argument("--bench-batch-sizes", type=_batch_sizes, default=[1, 16], metavar="N,N",
                         help="rows of the timed inputs (default 1,16)")
    inspect.add_argument("--bench-output", default=None, metavar="PATH",
                         help="also write the audit with the timings as JSON to PATH (implies --bench; "
                              "`python -m calib --speed_aware PATH` reads it)")
    inspect.add_argument("--bench-note", default=None, help="free text stored with the timings (e.g. the host's load)")
    inspect.set_defaults(func=cmd_inspect)
    _add_verify_parser(sub)
    sub.add_parser("convert", add_help=False,
                   help="re-write a quantized checkpoint for another runtime (compressed-tensors <-> "
                        "ascendv1); runs the offline tool `python -m calib.convert`, see --help there")
    return parser


OFFLINE_COMMANDS = {"convert": "calib.convert"}


def run_offline_tool(module: str, argv: Sequence[str]) -> int:
    """Run an offline tool (calib/) in a child interpreter: the runtime never imports calib/."""
    if importlib.util.find_spec(module.partition(".")[0]) is None:
        logger.error("%s is not installed (it ships with ascend-llm's calib package)", module)
        return 2
    return subprocess.run([sys.executable, "-m", module, *argv], check=False).returncode


def _add_eval_parser(sub: argparse._SubParsersAction) -> None:
    evaluate = sub.add_parser("eval", help="evaluate a model")
    kinds = evaluate.add_subparsers(dest="eval_kind", required=True)
    ppl = EngineArgs.add_cli_args(kinds.add_parser("ppl", help="perplexity on a text file"))
    ppl.add_argument("--file", required=True, help="UTF-8 text to score")
    ppl.add_argument("--max-tokens", type=int, default=16384, help="score the first N tokens")
    ppl.add_argument("--window", type=int, default=512, help="tokens per independently scored window")
    ppl.set_defaults(func=cmd_eval_ppl)


def _add_verify_parser(sub: argparse._SubParsersAction) -> None:
    from ascend_llm.eval.accuracy_guard import DEFAULT_MAX_KL, DEFAULT_MIN_TOP1
    verify = EngineArgs.add_cli_args(sub.add_parser(
        "verify", help="replay the checkpoint's accuracy_reference.json and report KL / top-1 agreement / "
                       "perplexity ratio against the float model and the numbers recorded at conversion"))
    verify.add_argument("model_path", nargs="?", default=None, help="model (same as --model)")
    verify.add_argument("--reference", default=None, metavar="FLOAT_MODEL",
                        help="build the reference from this float model (checkpoints of other tools)")
    verify.add_argument("--json", action="store_true", help="print JSON instead of a table")
    verify.add_argument("--max-kl", type=float, default=DEFAULT_MAX_KL, help="fail above this mean KL (nats)")
    verify.add_argument("--min-top1", type=float, default=DEFAULT_MIN_TOP1, help="fail below this top-1 agreement")
    verify.set_defaults(func=cmd_verify)


def _add_serve_parser(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    try:
        from ascend_llm.server.args import add_server_args
    except ImportError as exc:   # server extras missing: the other commands still work
        reason = str(exc)        # `exc` itself is unbound once the except block ends
        serve.set_defaults(func=lambda args: _missing_server(reason))
        return
    add_server_args(serve)
    serve.set_defaults(func=cmd_serve)


def _missing_server(reason: str) -> int:
    logger.error("the server is unavailable: %s", reason)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in OFFLINE_COMMANDS:
        return run_offline_tool(OFFLINE_COMMANDS[argv[0]], argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
