"""`ascend-llm eval ppl`: perplexity through prompt logprobs equals a transformers forward."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from ascend_llm import LLM
from ascend_llm.eval.perplexity import perplexity, split_windows


def test_split_windows():
    assert split_windows(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert split_windows(list(range(9)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]   # a 1-token tail scores nothing
    with pytest.raises(ValueError, match="window"):
        split_windows([1, 2, 3], 1)


def test_perplexity_matches_transformers(tiny_llama_dir):
    token_ids = torch.randint(3, 300, (70,), generator=torch.Generator().manual_seed(3)).tolist()
    llm = LLM(str(tiny_llama_dir), max_model_len=64)
    got = perplexity(llm, token_ids, window=32)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    nll, count = 0.0, 0
    with torch.inference_mode():
        for window in split_windows(token_ids, 32):
            logprobs = hf(torch.tensor([window])).logits[0].log_softmax(-1)
            nll -= logprobs[torch.arange(len(window) - 1), torch.tensor(window[1:])].sum().item()
            count += len(window) - 1
    assert got.num_scored == count == 67 and got.num_windows == 3
    assert got.perplexity == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_cli_prints_perplexity_last(tiny_llama_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("Full fathom five thy father lies; of his bones are coral made. " * 20)
    proc = subprocess.run([sys.executable, "-m", "ascend_llm.cli", "eval", "ppl", "--model", str(tiny_llama_dir),
                           "--file", str(text), "--max-tokens", "200", "--window", "64"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    value = float(proc.stdout.strip().splitlines()[-1].split()[-1])
    assert 1.0 < value < 1e6


def test_cli_reports_missing_file_clearly(tiny_llama_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ascend_llm.cli", "eval", "ppl", "--model", str(tiny_llama_dir),
                           "--file", str(tmp_path / "missing.txt")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "file: cannot read" in proc.stderr
    assert "Traceback" not in proc.stderr
