"""GET /v1/models."""
from __future__ import annotations

from ascend_llm.server.protocol import ModelCard, ModelList
from ascend_llm.server.serving_engine import ServingContext


def list_models(ctx: ServingContext) -> ModelList:
    llm = ctx.llm
    card = ModelCard(id=ctx.served_model_name, root=str(getattr(llm, "model_dir", ctx.config.model)),
                     max_model_len=ctx.max_model_len)
    return ModelList(data=[card])
