"""`serve --verify-accuracy`: replay the checkpoint's accuracy_reference.json once the model has
loaded (on the engine thread, before the first request is admitted), publish the scores as
metrics and report /health not-ready (503, with the reason) when they are past the thresholds.

Without a reference file `--verify-accuracy` fails start-up (exit 2) naming the missing file: a
guard asked for and silently skipped would read as a pass. Serving without the flag reads nothing.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Any, Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ascend_llm.eval.accuracy_guard import DEFAULT_MAX_KL, DEFAULT_MIN_TOP1, AccuracyReport, verify
from ascend_llm.eval.accuracy_reference import AccuracyReference, load_reference
from ascend_llm.server.metrics import PREFIX

logger = logging.getLogger("ascend_llm.server")


def add_accuracy_args(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--verify-accuracy", action="store_true",
        help="after load, replay the checkpoint's accuracy_reference.json; /health is 503 past the thresholds")
    add("--accuracy-max-kl", type=float, default=DEFAULT_MAX_KL,
        help="not ready above this mean KL(float || quantized), nats (default: %(default)s)")
    add("--accuracy-min-top1", type=float, default=DEFAULT_MIN_TOP1,
        help="not ready below this top-1 agreement with the float model (default: %(default)s)")


@dataclass(slots=True)
class AccuracyGuard:
    """The reference, the thresholds, and (once `check` ran) the report or why there is none."""
    reference: AccuracyReference
    max_kl: float = DEFAULT_MAX_KL
    min_top1: float = DEFAULT_MIN_TOP1
    report: AccuracyReport | None = None
    error: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace, model_dir: Any) -> "AccuracyGuard | None":
        """None without --verify-accuracy; AccuracyReferenceError when the file is missing / bad."""
        if not getattr(args, "verify_accuracy", False):
            return None
        return cls(load_reference(model_dir), args.accuracy_max_kl, args.accuracy_min_top1)

    def check(self, llm_engine: Any) -> Any:
        """Replay on `llm_engine` (an LLMEngine that has no other requests) and return it."""
        try:
            self.report = verify(llm_engine, self.reference, self.max_kl, self.min_top1)
        except Exception as exc:      # the guard's own failure must not take serving down
            logger.exception("accuracy verification failed to run")
            self.error = f"accuracy verification did not run: {exc}"
            return llm_engine
        log = logger.info if self.report.ok else logger.error
        log("accuracy guard on %s:\n%s", self.report.backend, self.report.text())
        return llm_engine

    def problem(self) -> str | None:
        """The /health reason while past a threshold (None when fine or not yet run)."""
        if self.error is not None:
            return self.error
        if self.report is not None and not self.report.ok:
            return f"accuracy guard: {self.report.reason()}"
        return None


class AccuracyCollector(Collector):
    """ascend_llm:accuracy_kl / _top1_agreement / _ppl_ratio, and _ok (1 within the thresholds)."""

    def __init__(self, guard: AccuracyGuard, model_name: str) -> None:
        self.guard = guard
        self.model_name = model_name

    def collect(self) -> Iterator[Any]:
        report = self.guard.report
        if report is None:
            return
        values = {"accuracy_kl": ("Mean KL(float || quantized) on the checkpoint's accuracy reference.",
                                  report.scores.mean_kl),
                  "accuracy_top1_agreement": ("Share of positions where the top-1 token matches the float model.",
                                              report.scores.top1_agreement),
                  "accuracy_ppl_ratio": ("Perplexity on the reference prompts over the float model's.",
                                         report.scores.ppl_ratio),
                  "accuracy_ok": ("1 when the accuracy guard passed its thresholds, else 0.", float(report.ok))}
        for name, (doc, value) in values.items():
            family = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric([self.model_name], value)
            yield family


def install(app: Any, guard: AccuracyGuard) -> None:
    """Wire the guard into a built app: /health consults it, /metrics exports it."""
    handlers = app.state.handlers
    handlers.engine.health_checks.append(guard.problem)
    handlers.metrics.registry.register(AccuracyCollector(guard, handlers.metrics.model_name))
