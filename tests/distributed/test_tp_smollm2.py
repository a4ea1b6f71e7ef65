"""SmolLM2-135M (9 heads, 3 KV heads, tied 49152-token vocab) split over 3 gloo ranks gives the
logits of one process.

- float and online wint8 / wint4 (row-parallel scales max-reduced over the group): max |diff|
  < 1e-3 in fp32, only the summation order differs, and the same greedy tokens. Measured
  1.0e-4 float, 7.8e-5 wint8, 6.4e-5 wint4 on logits spanning -10..34.
- activation-quantized methods, an msModelSlim W8A8 static checkpoint and online fp8: the
  rank-local float partial sums of row-parallel layers (and, for fp8, each rank's per-tensor
  scale of its activation slice, as in vLLM) move values across int8 / e4m3 rounding
  boundaries, and this model amplifies such flips (see tests/e2e/test_npu_backend.py), so TP=3
  is not TP=1 token for token: measured max / mean |TP=3 - TP=1| 7.7 / 1.18 (W8A8) and 16.4 /
  1.25 (fp8), against their own quantization error vs float of 14.7 / 2.37 and 5.3 / 0.88.
  What must hold is that TP=3 is as close to float as TP=1 is: mean |TP=3 - float| within
  1.5x of mean |TP=1 - float| (measured 2.42 vs 2.37 W8A8, 1.13 vs 0.88 fp8), and the top-1
  token equal on most positions.
"""
from __future__ import annotations

import pytest
import torch

from ascend_llm.loader import resolve_model_path
from tests.distributed.tp_harness import Job, spawn_logits
from tests.quant.w8a8_writer import write_w8a8_checkpoint

EXACT = ("float", "wint8", "wint4")


@pytest.mark.slow
def test_smollm2_tp3_logits_match_tp1(tmp_path):
    model_dir = str(resolve_model_path("smollm2-135m-instruct"))
    w8a8 = str(write_w8a8_checkpoint(model_dir, tmp_path / "w8a8", num_prompts=2))
    jobs = [Job("float", model_dir), Job("wint8", model_dir, "wint8"), Job("wint4", model_dir, "wint4"),
            Job("w8a8", w8a8), Job("fp8", model_dir, "fp8")]
    want, got = spawn_logits(1, jobs), spawn_logits(3, jobs)
    for job in jobs:
        assert isinstance(got[job.name], torch.Tensor), got[job.name]
        assert got[job.name].shape == want[job.name].shape == (18, 49152)
        diff = (got[job.name] - want[job.name]).abs()
        if job.name in EXACT:
            assert float(diff.max()) < 1e-3, (job.name, float(diff.max()))
            assert torch.equal(got[job.name].argmax(-1), want[job.name].argmax(-1)), job.name
            continue
        tp1_error = float((want[job.name] - want["float"]).abs().mean())
        tp3_error = float((got[job.name] - want["float"]).abs().mean())
        assert tp3_error < 1.5 * tp1_error, (job.name, tp3_error, tp1_error)
        agree = float((got[job.name].argmax(-1) == want[job.name].argmax(-1)).float().mean())
        assert agree >= 0.7, (job.name, agree)                   # measured 0.83 (15 of 18) both
