"""The offline API: LLM(model=...).generate(prompts, SamplingParams) / .chat(messages)."""
from __future__ import annotations

import itertools
from dataclasses import fields
from typing import Any, Sequence as Seq

from tqdm.auto import tqdm

from ascend_llm.engine.arg_utils import EngineArgs
from ascend_llm.engine.llm_engine import LLMEngine
from ascend_llm.loader import DEFAULT_MODEL
from ascend_llm.outputs import RequestOutput
from ascend_llm.sampling_params import SamplingParams

PromptType = str | list[int] | dict[str, Any]


class LLM:
    """An engine plus a synchronous generate loop (vLLM / FastDeploy compatible surface)."""

    def __init__(self, model: str = DEFAULT_MODEL, **kwargs: Any) -> None:
        known = {f.name for f in fields(EngineArgs)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"LLM: unknown argument(s) {unknown}; supported: {sorted(known)}")
        self.llm_engine = LLMEngine.from_engine_args(EngineArgs(model=model, **kwargs))
        self._request_ids = itertools.count()

    def shutdown(self) -> None:
        """Stop tensor-parallel worker processes (also done at interpreter exit)."""
        self.llm_engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def generate(self, prompts: PromptType | Seq[PromptType] | None = None,
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 prompt_token_ids: list[list[int]] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in prompt order."""
        inputs = _normalise_prompts(prompts, prompt_token_ids)
        params = _broadcast_params(sampling_params, len(inputs))
        return self._run(inputs, params, use_tqdm)

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self._render_chat(conv, chat_template, add_generation_prompt)
                   for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _render_chat(self, conversation: list[dict[str, Any]], chat_template: str | None,
                     add_generation_prompt: bool) -> dict[str, Any]:
        tokenizer = self.get_tokenizer()
        try:
            text = tokenizer.apply_chat_template(conversation, chat_template=chat_template,
                                                 add_generation_prompt=add_generation_prompt,
                                                 tokenize=False)
        except Exception as exc:  # template errors come from jinja with little context
            raise ValueError(f"messages: could not apply the chat template: {exc}") from exc
        return {"prompt": text,
                "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}

    def _run(self, inputs: list[dict[str, Any]], params: list[SamplingParams],
             use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        ids = [str(next(self._request_ids)) for _ in inputs]
        try:
            for request_id, inp, p in zip(ids, inputs, params):
                engine.add_request(request_id, inp.get("prompt"), p, inp.get("prompt_token_ids"))
        except ValueError:
            for request_id in ids:
                engine.abort_request(request_id)
            raise
        results: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm) as bar:
            while len(results) < len(ids):
                for out in engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        bar.update(1)
        return [results[request_id] for request_id in ids]


def _normalise_prompts(prompts: Any, prompt_token_ids: list[list[int]] | None) -> list[dict[str, Any]]:
    if prompts is None and prompt_token_ids is None:
        raise ValueError("prompts: give prompts or prompt_token_ids")
    if prompts is None:
        return [{"prompt": None, "prompt_token_ids": list(ids)} for ids in prompt_token_ids]
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                            and isinstance(prompts[0], int)):
        prompts = [prompts]
    result = []
    for p in prompts:
        if isinstance(p, str):
            result.append({"prompt": p})
        elif isinstance(p, dict) and ("prompt" in p or "prompt_token_ids" in p):
            result.append(dict(p))
        elif isinstance(p, list):
            result.append({"prompt": None, "prompt_token_ids": p})
        else:
            raise ValueError(f"prompts: unsupported prompt {p!r} (str, token id list, or dict "
                             "with 'prompt' / 'prompt_token_ids')")
    return result


def _broadcast_params(params: Any, num_prompts: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * num_prompts
    if isinstance(params, SamplingParams):
        return [params] * num_prompts
    params = list(params)
    if len(params) != num_prompts:
        raise ValueError(f"sampling_params: {len(params)} given for {num_prompts} prompts")
    return params
