"""SmolLM2-135M (9 heads, 3 KV heads, tied 49152-token vocab) split over 3 gloo ranks gives the
logits of one process, float and online wint8 (row-parallel scales max-reduced over the group):
max |diff| < 1e-3 (fp32; only the summation order differs: measured 1.0e-4 float and 7.8e-5
wint8 on logits spanning -10..34), and the same greedy tokens."""
from __future__ import annotations

import pytest
import torch

from ascend_llm.loader import resolve_model_path
from tests.distributed.tp_harness import Job, spawn_logits


@pytest.mark.slow
def test_smollm2_tp3_logits_match_tp1():
    model_dir = str(resolve_model_path("smollm2-135m-instruct"))
    jobs = [Job("float", model_dir), Job("wint8", model_dir, "wint8")]
    want, got = spawn_logits(1, jobs), spawn_logits(3, jobs)
    for job in jobs:
        assert isinstance(got[job.name], torch.Tensor), got[job.name]
        assert got[job.name].shape == want[job.name].shape == (18, 49152)
        diff = float((got[job.name] - want[job.name]).abs().max())
        assert diff < 1e-3, (job.name, diff)
        assert torch.equal(got[job.name].argmax(-1), want[job.name].argmax(-1))
