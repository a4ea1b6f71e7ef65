"""POST /tokenize and /detokenize."""
from __future__ import annotations

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

    def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        self.ctx.check_model(req.model)
        ids = self.ctx.check_token_ids(req.tokens, "tokens")
        return DetokenizeResponse(prompt=self.ctx.tokenizer.decode(ids))
