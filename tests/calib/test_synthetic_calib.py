"""Calibration texts sampled from the float model (calib/synthetic.py), on a tiny Llama."""
from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ascend_llm import LLM
from calib.synthetic import (SyntheticSpec, main, prefix_starts, random_starts,
                                              sample_token_ids, write_synthetic_calib)
from calib.texts import read_calib_texts

SPEC = SyntheticSpec(num_texts=6, max_tokens=24, seed=3)


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    with LLM(str(tiny_llama_dir), max_model_len=64, max_num_seqs=4) as engine:
        yield engine


def test_every_text_is_a_full_row_without_eos(llm):
    tokenizer = llm.get_tokenizer()
    starts = random_starts(tokenizer, SPEC.num_texts, SPEC.seed)
    rows = sample_token_ids(llm, starts, SPEC)
    assert len(rows) == SPEC.num_texts
    for start, ids in zip(starts, rows):
        assert ids[:len(start)] == start and len(ids) == len(start) + SPEC.max_tokens
        assert tokenizer.eos_token_id not in ids[len(start):]
    assert len({tuple(r) for r in rows}) == len(rows), "texts with different seeds came out equal"


def test_seeded_and_independent_of_batching(llm, tiny_llama_dir):
    starts = random_starts(llm.get_tokenizer(), 4, seed=0)
    together = sample_token_ids(llm, starts, SPEC)
    with LLM(str(tiny_llama_dir), max_model_len=64, max_num_seqs=1) as one_at_a_time:
        alone = sample_token_ids(one_at_a_time, starts, SPEC)
    assert together == alone
    other_seed = sample_token_ids(llm, starts, SyntheticSpec(4, 24, seed=99))
    assert other_seed != together


def test_samples_follow_the_model_distribution(llm, tiny_llama_dir):
    """Temperature 1 over the whole vocabulary: the sampled tokens' mean log-probability under the
    model equals minus its mean entropy at those positions (within sampling noise), which greedy or
    truncated sampling would not give (their tokens are more likely than average)."""
    spec = SyntheticSpec(num_texts=16, max_tokens=32, seed=0)
    starts = random_starts(llm.get_tokenizer(), spec.num_texts, spec.seed)
    ids = torch.tensor(sample_token_ids(llm, starts, spec))                      # [N, 1 + T]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[:, :-1].float(), dim=-1)   # [N, T, V]
    chosen = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)                     # [N, T]
    entropy = -(logp.exp() * logp).sum(-1)                                       # [N, T]
    eos = llm.get_tokenizer().eos_token_id   # min_tokens masks EOS: renormalised distribution
    assert torch.all(logp[..., eos].exp() < 0.05)
    gap, noise = float(chosen.mean() + entropy.mean()), float(chosen.std() / math.sqrt(chosen.numel()))
    assert abs(gap) < 4 * noise + 0.02, (gap, noise)


def test_random_starts_skip_special_tokens(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    starts = random_starts(tokenizer, 200, seed=1)
    assert all(len(s) == 1 and s[0] not in tokenizer.all_special_ids for s in starts)
    assert len({s[0] for s in starts}) > 50
    assert starts == random_starts(tokenizer, 200, seed=1)


def test_prefix_starts_cycle_through_texts(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    texts = ["the cat sat on the mat today", "a dog ran far away from home"]
    starts = prefix_starts(tokenizer, texts, 5, prefix_tokens=3)
    first = [tokenizer.encode(t, add_special_tokens=False)[:3] for t in texts]
    assert starts == [first[0], first[1], first[0], first[1], first[0]]


def test_cli_writes_a_calibration_file(tiny_llama_dir, tmp_path):
    prefixes = tmp_path / "prefix.jsonl"
    prefixes.write_text(json.dumps({"text": "the cat sat on the mat"}) + "\n")
    out = tmp_path / "gen" / "texts.jsonl"
    main(["--model", str(tiny_llama_dir), "--output", str(out), "--num_texts", "3", "--max_tokens", "16",
          "--prefix_file", str(prefixes), "--prefix_tokens", "2", "--max_num_seqs", "2"])
    texts = read_calib_texts(out)
    assert len(texts) == 3 and all(t.strip() for t in texts)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    start = tokenizer.decode(tokenizer.encode("the cat sat on the mat", add_special_tokens=False)[:2])
    assert all(t.startswith(start) for t in texts)


@pytest.mark.parametrize("flags, field", [(["--temperature", "nan"], "temperature"),
                                          (["--temperature", "0"], "temperature"),
                                          (["--num_texts", "0"], "num_texts")])
def test_bad_values_name_the_field(tiny_llama_dir, tmp_path, capsys, flags, field):
    with pytest.raises(SystemExit) as exc:
        main(["--model", str(tiny_llama_dir), "--output", str(tmp_path / "x.jsonl"), *flags])
    assert exc.value.code == 2
    assert field in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()


def test_output_that_is_a_directory_is_refused(tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        write_synthetic_calib(str(tiny_llama_dir), tmp_path, SyntheticSpec(num_texts=1, max_tokens=4))
