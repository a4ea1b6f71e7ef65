"""POST /v1/embeddings: LAST pooling of the final hidden states, L2-normalised (vLLM's default pooler
for decoder-only models), in OpenAI's response shape with float or base64 encoding."""
from __future__ import annotations

import base64
import math
import struct

from ascend_llm.sampling_params import SamplingParams
from ascend_llm.server.errors import bad_request
from ascend_llm.server.protocol import EmbeddingData, EmbeddingRequest, EmbeddingResponse, UsageInfo, random_id
from ascend_llm.server.serving_completion import normalize_prompt
from ascend_llm.server.serving_engine import PromptInput, ServingContext


class EmbeddingServing:
    """Runs each input as a one-token request that returns its last prompt token's hidden state."""

    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create(self, req: EmbeddingRequest) -> EmbeddingResponse:
        model = self.ctx.check_model(req.model)
        prompts = [self._prompt_input(p) for p in _inputs(req.input)]
        size = self.ctx.llm.hf_config.hidden_size
        if req.dimensions is not None and req.dimensions != size:
            raise bad_request(f"dimensions: this model's embeddings have {size} dimensions and cannot be "
                              f"shortened; got {req.dimensions}", "dimensions")
        params = []
        for prompt in prompts:   # the one generated token is dropped; it only checks the context fits
            self.ctx.resolve_max_tokens(1, len(prompt.token_ids), "input", "input")
            params.append(SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, return_embedding=True))
        stream = await self.ctx.submit(random_id("embd"), prompts, params)
        finals = await stream.collect()
        data = [EmbeddingData(index=i, embedding=_encode(_normalise(out.embedding), req.encoding_format))
                for i, out in enumerate(finals)]
        tokens = sum(len(p.token_ids) for p in prompts)
        return EmbeddingResponse(id=random_id("embd"), model=model, data=data,
                                 usage=UsageInfo(prompt_tokens=tokens, total_tokens=tokens))

    def _prompt_input(self, prompt: str | list[int]) -> PromptInput:
        if isinstance(prompt, str):
            return PromptInput(prompt, self.ctx.encode(prompt, "input"))
        return PromptInput(None, self.ctx.check_token_ids(prompt, "input"))


def _inputs(value: object) -> list[str | list[int]]:
    """`input` as engine prompts; the 400s name `input` (OpenAI's field), not `prompt`."""
    if value is None:
        raise bad_request("input: is required", "input")
    try:
        return normalize_prompt(value)
    except Exception as exc:
        message = str(getattr(exc, "message", exc)).replace("prompt", "input")
        raise bad_request(message, "input") from None


def _normalise(vector: list[float] | None) -> list[float]:
    if vector is None:
        raise RuntimeError("the engine returned no embedding")
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector
