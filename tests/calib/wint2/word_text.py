"""Random-word text over the tiny tokenizer's corpus, for calibrating and scoring tiny WINT2
checkpoints: calibration files and unseen prompts share one word distribution."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ascend_llm import LLM, SamplingParams
from tests.quant.linear_fixtures import gen

WORDS = ("the quick brown fox jumps over lazy dog full fathom five thy father lies of his bones are "
         "coral made we such stuff as dreams on and our little life is rounded with a sleep").split()
SCORE_PARAMS = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, ignore_eos=True)


def word_text(seed: int, num_words: int = 200) -> str:
    """`num_words` random words (seeded)."""
    return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (num_words,), generator=gen(seed)))


def word_text_file(path: Path, num_texts: int = 8) -> Path:
    """A calibration JSONL file of `num_texts` texts (seeds 0 ..)."""
    path.write_text("".join(json.dumps({"text": word_text(seed)}) + "\n" for seed in range(num_texts)),
                    encoding="utf-8")
    return path


def unseen_prompts(tokenizer, count: int = 4, length: int = 40) -> list[list[int]]:
    """Prompts from seeds 100 .. (never in a calibration file)."""
    return [tokenizer.encode(word_text(100 + i, length))[:length] for i in range(count)]


def prompt_logprobs(model_dir: Path) -> torch.Tensor:
    """The engine's log-probs of 4 unseen prompts' own tokens, [4 * 39]."""
    llm = LLM(str(model_dir), max_model_len=96)
    prompts = unseen_prompts(llm.get_tokenizer())
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=SCORE_PARAMS, use_tqdm=False)
    return torch.tensor([e[t].logprob for p, o in zip(prompts, outs) for t, e in zip(p[1:], o.prompt_logprobs[1:])])
