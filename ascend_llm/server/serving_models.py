"""GET /v1/models and /v1/models/{model_id}."""
from __future__ import annotations

from ascend_llm.server.protocol import ModelCard, ModelList
from ascend_llm.server.serving_engine import ServingContext


def model_card(ctx: ServingContext) -> ModelCard:
    llm = ctx.llm
    return ModelCard(id=ctx.served_model_name, root=str(getattr(llm, "model_dir", ctx.config.model)),
                     max_model_len=ctx.max_model_len)


def list_models(ctx: ServingContext) -> ModelList:
    return ModelList(data=[model_card(ctx)])


def retrieve_model(ctx: ServingContext, model_id: str) -> ModelCard:
    """The served model's card for any of its names; 404 in OpenAI's error shape otherwise."""
    ctx.check_model(model_id)
    return model_card(ctx)
