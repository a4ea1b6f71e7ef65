"""Speculative decoding: draft proposers and the verification rule."""
from ascend_llm.spec_decode.ngram_proposer import NgramProposer
from ascend_llm.spec_decode.verify import accepted_tokens

__all__ = ["NgramProposer", "accepted_tokens"]
