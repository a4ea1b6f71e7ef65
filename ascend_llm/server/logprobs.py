"""Engine logprobs (per token: token id -> Logprob) in the completions and chat response formats."""
from __future__ import annotations

from typing import Any

from ascend_llm.outputs import Logprob
from ascend_llm.server.protocol import ChatLogProbs, ChatTokenLogprob, CompletionLogProbs, TopLogprob
from ascend_llm.server.serving_engine import clamp_logprob


def _token_text(token_id: int, entry: Logprob | None, tokenizer: Any) -> str:
    if entry is not None and entry.decoded_token is not None:
        return entry.decoded_token
    return tokenizer.decode([token_id])


def _token_name(token_id: int, entry: Logprob | None, tokenizer: Any, as_token_ids: bool) -> str:
    """How a token is shown: its text, or vLLM's `token_id:N` under `return_tokens_as_token_ids`."""
    return f"token_id:{token_id}" if as_token_ids else _token_text(token_id, entry, tokenizer)


def _top(entry: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    """The k most likely tokens of one position, by rank."""
    ranked = sorted(entry.items(), key=lambda kv: (kv[1].rank if kv[1].rank is not None else 1 << 30,
                                                   -kv[1].logprob))
    return ranked[:k]


def completion_logprobs(token_ids: list[int], logprobs: list[dict[int, Logprob] | None], k: int,
                        tokenizer: Any, text_offset: int = 0, as_token_ids: bool = False) -> CompletionLogProbs:
    """Legacy completions format: tokens, token_logprobs, top_logprobs (k + sampled), text_offset.

    A None entry (the first prompt token under echo) has no logprob and no alternatives.
    `text_offset` counts characters of the text, also when tokens are shown as `token_id:N`."""
    result = CompletionLogProbs()
    for token_id, entry in zip(token_ids, logprobs):
        sampled = entry.get(token_id) if entry is not None else None
        token = _token_name(token_id, sampled, tokenizer, as_token_ids)
        result.tokens.append(token)
        result.token_logprobs.append(clamp_logprob(sampled.logprob) if sampled else None)
        top = None
        if entry is not None:
            top = {_token_name(tid, lp, tokenizer, as_token_ids): clamp_logprob(lp.logprob)
                   for tid, lp in _top(entry, k)}
            if sampled is not None:
                top[token] = clamp_logprob(sampled.logprob)   # the sampled token wins a text collision
        result.top_logprobs.append(top)
        result.text_offset.append(text_offset)
        text_offset += len(_token_text(token_id, sampled, tokenizer))
    result.end_offset = text_offset
    return result


def prompt_logprobs_json(prompt_logprobs: list[dict[int, Logprob] | None] | None) -> list | None:
    """vLLM's `prompt_logprobs` field: per prompt position None or {token id: {logprob, rank, decoded_token}}."""
    if prompt_logprobs is None:
        return None
    return [None if entry is None else
            {str(tid): {"logprob": clamp_logprob(lp.logprob), "rank": lp.rank, "decoded_token": lp.decoded_token}
             for tid, lp in entry.items()}
            for entry in prompt_logprobs]


def chat_logprobs(token_ids: list[int], logprobs: list[dict[int, Logprob]], k: int,
                  tokenizer: Any, as_token_ids: bool = False) -> ChatLogProbs:
    """Chat format: per token its text (or `token_id:N`), logprob, UTF-8 bytes and the k most likely alternatives."""
    content = []
    for token_id, entry in zip(token_ids, logprobs):
        sampled = entry.get(token_id)
        token = _token_name(token_id, sampled, tokenizer, as_token_ids)
        top = [TopLogprob(token=(text := _token_name(tid, lp, tokenizer, as_token_ids)),
                          logprob=clamp_logprob(lp.logprob),
                          bytes=list(text.encode("utf-8"))) for tid, lp in _top(entry, k)]
        content.append(ChatTokenLogprob(token=token, logprob=clamp_logprob(sampled.logprob) if sampled else
                                        -9999.0, bytes=list(token.encode("utf-8")), top_logprobs=top))
    return ChatLogProbs(content=content)
