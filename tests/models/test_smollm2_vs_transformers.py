"""Our Llama on the real SmolLM2-135M-Instruct weights against transformers (fp32)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ascend_llm.loader import resolve_model_path
from tests.models.test_logits_vs_transformers import build_ours, run_chunks

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "eval_tempest.txt"


@pytest.mark.slow
def test_smollm2_logits_match_transformers():
    model_dir = resolve_model_path("smollm2-135m-instruct")
    text = DATA.read_text()[2000:4000] if DATA.exists() else "Full fathom five thy father lies. " * 20
    token_ids = AutoTokenizer.from_pretrained(model_dir).encode(text)[:96]
    config, ours = build_ours(model_dir)
    got = run_chunks(ours, config, token_ids, [40, 31, 1, 1, 23], num_blocks=64)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        want = hf(torch.tensor([token_ids])).logits[0]
    max_diff = (got - want).abs().max().item()
    # fp32 both sides, logits of magnitude ~10-30; differences are summation order only
    assert max_diff < 1e-3, max_diff   # measured 2026-11-23: 6.0e-5
    assert torch.equal(got.argmax(-1), want.argmax(-1))
