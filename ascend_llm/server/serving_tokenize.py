"""POST /tokenize and /detokenize, GET /tokenizer_info."""
from __future__ import annotations

from typing import Any

from ascend_llm.server.errors import bad_request
from ascend_llm.server.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from ascend_llm.server.serving_chat import ChatServing
from ascend_llm.server.serving_engine import ServingContext
from ascend_llm.server.serving_tools import check_tools


class TokenizeServing:
    """Tokenizes a prompt (or chat messages through the template) and detokenizes token ids."""

    def __init__(self, ctx: ServingContext, chat: ChatServing) -> None:
        self.ctx = ctx
        self.chat = chat

    def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        self.ctx.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("give exactly one of `prompt` and `messages`", "prompt")
        if req.tools is not None and req.messages is None:
            raise bad_request("tools: only allowed with `messages`", "tools")
        if req.messages is not None:
            tools = check_tools(req.tools) if req.tools else None
            ids = self.chat.render(req.messages, req.add_generation_prompt, tools=tools).token_ids
        else:
            ids = self.ctx.encode(req.prompt, "prompt", req.add_special_tokens)
        return TokenizeResponse(count=len(ids), max_model_len=self.ctx.max_model_len, tokens=ids)

    def tokenizer_info(self) -> dict[str, Any]:
        """vLLM's /tokenizer_info: the tokenizer's init kwargs made JSON-safe, its class and the chat template
        the server applies (lm-eval's RemoteTokenizer reads eos_token / bos_token / pad_token / chat_template)."""
        tokenizer = self.ctx.tokenizer
        kwargs = getattr(tokenizer, "init_kwargs", None) or {}
        info = {key: _json_safe(value) for key, value in kwargs.items() if key not in _NOT_EXPORTED}
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            info.setdefault(name, _json_safe(getattr(tokenizer, name, None)))
        info["tokenizer_class"] = type(tokenizer).__name__
        template = self.ctx.config.chat_template or getattr(tokenizer, "chat_template", None)
        if template:
            info["chat_template"] = template
        return info

    def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        self.ctx.check_model(req.model)
        ids = self.ctx.check_token_ids(req.tokens, "tokens")
        return DetokenizeResponse(prompt=self.ctx.tokenizer.decode(ids))


# objects that are not configuration (the Rust tokenizer) or are large and derivable from /tokenize
_NOT_EXPORTED = frozenset({"tokenizer_object", "added_tokens_decoder"})


def _json_safe(value: Any) -> Any:
    """Special tokens (AddedToken) as their text, containers recursively, anything else unknown as str."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "content"):
        return str(value.content)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return str(value)
