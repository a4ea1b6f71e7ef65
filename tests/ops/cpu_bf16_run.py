"""One bfloat16 CPU engine run of a model directory, as plain data, for tests/ops/test_cpu_features.py:
in the test process, or in a child started with ONEDNN_MAX_CPU_ISA=AVX2 (`python -m
tests.ops.cpu_bf16_run DIR` prints the run as JSON)."""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

PROMPT = list(range(5, 45))     # 40 token ids of the tiny models' 384-token vocabulary
NEW_TOKENS = 8


@dataclass(frozen=True)
class Bf16Run:
    """What a bf16 run produced and which linear kernels it bound."""
    prompt_logprobs: list[float]        # log-prob of each prompt token given the ones before
    tokens: list[int]                   # greedy continuation
    margins: list[float]                # top-1 minus top-2 log-prob at each generated step
    kernels: list[str]                  # names of the linear kernels bound to the model's layers
    onednn_reason: str | None           # the probe's reason oneDNN bf16 steps aside (None: it runs)


def bf16_run(model_dir: Path) -> Bf16Run:
    """Greedy decoding of PROMPT and its teacher-forced log-probs, dtype bfloat16, on the CPU."""
    import torch

    from ascend_llm import LLM, SamplingParams
    from ascend_llm.ops.cpu_features import cpu_features

    llm = LLM(str(model_dir), device="cpu", dtype="bfloat16", max_model_len=64)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    out = llm.generate(prompt_token_ids=[PROMPT], sampling_params=params, use_tqdm=False)[0]
    prompt_lps = [entry[token].logprob for token, entry in zip(PROMPT[1:], out.prompt_logprobs[1:])]
    top2 = [sorted((lp.logprob for lp in step.values()), reverse=True)[:2] for step in out.outputs[0].logprobs]
    model = llm.llm_engine.model_runner.model
    kernels = sorted({m.linear_kernel.name for m in model.modules() if getattr(m, "linear_kernel", None)})
    return Bf16Run(prompt_lps, list(out.outputs[0].token_ids), [a - b for a, b in top2], kernels,
                   cpu_features().onednn_unavailable(torch.bfloat16))


if __name__ == "__main__":
    print(json.dumps(asdict(bf16_run(Path(sys.argv[1])))))
