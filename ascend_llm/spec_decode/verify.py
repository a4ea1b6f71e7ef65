"""Verification of draft tokens (vLLM's rejection sampler, specialised to deterministic drafts).

Row j of a verified sequence holds the target model's sample given the context plus drafts
d_1..d_j. A draft proposer that puts probability 1 on its draft (n-gram lookup does) makes
the rejection rule "accept d_{j+1} with probability p_j(d_{j+1}), else sample from p_j with
d_{j+1} removed". Drawing t_j ~ p_j and accepting when t_j == d_{j+1} does exactly that: the
acceptance probability is p_j(d_{j+1}) and a rejected t_j is distributed as p_j restricted to
the other tokens. So the output follows the target distribution (greedy: equals plain decode).
"""
from __future__ import annotations


def accepted_tokens(draft_token_ids: list[int], sampled_token_ids: list[int]) -> list[int]:
    """The tokens a verified step emits: accepted drafts, then the first disagreeing (or bonus)
    sample. `sampled_token_ids` has one row per draft plus one: [len(draft_token_ids) + 1]."""
    if len(sampled_token_ids) != len(draft_token_ids) + 1:
        raise ValueError(f"accepted_tokens: {len(sampled_token_ids)} sampled rows for "
                         f"{len(draft_token_ids)} drafts (need one more row than drafts)")
    num_accepted = 0
    for draft, sampled in zip(draft_token_ids, sampled_token_ids):
        if draft != sampled:
            break
        num_accepted += 1
    return list(sampled_token_ids[:num_accepted + 1])
