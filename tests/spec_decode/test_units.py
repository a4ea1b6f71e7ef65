"""N-gram proposer, verification rule, speculative config parsing and the scheduler's
bookkeeping of draft tokens (no model)."""
from __future__ import annotations

import argparse

import pytest

from ascend_llm.config import CacheConfig, SchedulerConfig, SpeculativeConfig
from ascend_llm.engine.arg_utils import EngineArgs
from ascend_llm.engine.scheduler import Scheduler
from ascend_llm.engine.sequence import Sequence
from ascend_llm.sampling_params import SamplingParams
from ascend_llm.spec_decode import NgramProposer, accepted_tokens


def proposer(k: int = 3, lo: int = 1, hi: int = 3) -> NgramProposer:
    return NgramProposer(SpeculativeConfig(num_speculative_tokens=k, prompt_lookup_min=lo,
                                           prompt_lookup_max=hi))


def test_ngram_takes_the_longest_then_most_recent_match():
    # suffix [7, 8, 9]: the 3-gram matched at index 1 wins over the later 1-gram match of 9
    assert proposer().propose([5, 7, 8, 9, 20, 21, 22, 9, 30, 31, 7, 8, 9]) == [20, 21, 22]
    # two earlier occurrences of [1, 2]: the most recent one is followed by 6
    assert proposer(hi=2).propose([1, 2, 5, 1, 2, 6, 1, 2]) == [6, 1, 2]
    # a loop keeps proposing its continuation
    assert proposer(k=5).propose([4, 5, 6, 4, 5, 6, 4]) == [5, 6, 4]


def test_ngram_limits_and_misses():
    assert proposer().propose([1, 2, 3, 4]) == []                     # nothing repeats
    assert proposer().propose([3]) == []                              # too short to match
    assert proposer(k=5).propose([1, 2, 3, 1, 2], max_tokens=1) == [3]
    assert proposer(k=5).propose([1, 2, 3, 1, 2], max_tokens=0) == []
    assert proposer(lo=2, hi=3).propose([9, 1, 5, 1]) == []            # only a 1-gram repeats


def test_accepted_tokens_rule():
    assert accepted_tokens([4, 5, 6], [4, 5, 6, 7]) == [4, 5, 6, 7]    # all drafts plus the bonus
    assert accepted_tokens([4, 5, 6], [4, 9, 6, 7]) == [4, 9]         # first mismatch is kept
    assert accepted_tokens([4, 5, 6], [8, 5, 6, 7]) == [8]
    assert accepted_tokens([], [3]) == [3]
    with pytest.raises(ValueError, match="one more row than drafts"):
        accepted_tokens([4, 5], [4, 5])


@pytest.mark.parametrize("value, field", [
    ('{"method": "eagle"}', "method"),
    ('{"num_speculative_tokens": 0}', "num_speculative_tokens"),
    ('{"num_speculative_tokens": true}', "num_speculative_tokens"),
    ('{"prompt_lookup_min": 4, "prompt_lookup_max": 2}', "prompt_lookup_min"),
    ('{"disable_by_batch_size": -1}', "disable_by_batch_size"),
    ('{"num_speculative_token": 3}', "unknown keys"),
    ('{"method": "ngram",', "not valid JSON"),
    ('[1, 2]', "expected a JSON object"),
])
def test_bad_speculative_config_names_the_problem(value, field):
    with pytest.raises(ValueError, match=field):
        SpeculativeConfig.parse(value)


def test_speculative_config_from_the_cli():
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    args = parser.parse_args(["--speculative-config",
                              '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}'])
    config = EngineArgs.from_cli_args(args).speculative()
    assert (config.method, config.num_speculative_tokens, config.prompt_lookup_max) == ("ngram", 4, 3)
    assert EngineArgs().speculative() is None


def make_scheduler(max_tokens_budget: int = 64, num_blocks: int = 64, **spec) -> Scheduler:
    config = SpeculativeConfig(**{"num_speculative_tokens": 4, "prompt_lookup_max": 2, **spec})
    return Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=max_tokens_budget,
                                     max_model_len=128), CacheConfig(block_size=4),
                     num_blocks, eos_token_ids={2}, speculative_config=config)


def decode_ready(sched: Scheduler, prompt: list[int], **params) -> Sequence:
    """Admit a sequence and run its prefill, sampling `prompt[-1]`'s successor as 9."""
    seq = Sequence(len(sched.running) + len(sched.waiting), "r", 0, prompt,
                   SamplingParams(temperature=0.0, **params))
    sched.add_seq(seq)
    out = sched.schedule()
    sched.update(out, [9 if item.do_sample else None for item in out.scheduled])
    return seq


def test_scheduler_schedules_drafts_and_keeps_kv_of_accepted_ones_only():
    sched = make_scheduler()
    seq = decode_ready(sched, [5, 6, 7, 9, 5, 6, 7], max_tokens=20)      # + sampled 9
    out = sched.schedule()
    (item,) = out.scheduled
    assert item.spec_token_ids == [5, 6, 7, 9] and item.num_new_tokens == 5
    assert len(seq.block_table) * 4 >= seq.num_tokens + 4                 # slots for the drafts
    sched.update(out, [[5, 6, 3]])                                        # 2 accepted, then 3
    assert seq.output_token_ids == [9, 5, 6, 3] and item.num_appended == 3
    assert seq.num_computed_tokens == seq.num_tokens - 1                  # the rejected draft's KV is not counted
    assert (sched.num_draft_tokens, sched.num_accepted_tokens) == (4, 2)
    sched.check_invariants()


def test_drafts_respect_max_tokens_budget_and_batch_size_switch():
    sched = make_scheduler()
    seq = decode_ready(sched, [5, 6, 7, 9, 5, 6, 7], max_tokens=3)
    (item,) = sched.schedule().scheduled
    assert len(item.spec_token_ids) == 1                                  # 1 output + 1 draft + 1 bonus = 3
    small_budget = make_scheduler(max_tokens_budget=8)
    decode_ready(small_budget, [5, 6, 7, 9, 5, 6, 7], max_tokens=20)
    (item,) = small_budget.schedule().scheduled
    assert item.num_new_tokens <= 8
    off = make_scheduler(disable_by_batch_size=1)
    decode_ready(off, [5, 6, 7, 9, 5, 6, 7], max_tokens=20)
    (item,) = off.schedule().scheduled
    assert item.spec_token_ids == [] and item.num_new_tokens == 1
    assert seq.num_output_tokens == 1


def test_a_stop_inside_the_accepted_run_drops_the_rest():
    sched = make_scheduler()
    seq = decode_ready(sched, [5, 6, 7, 9, 5, 6, 7], max_tokens=20)
    out = sched.schedule()
    finished = sched.update(out, [[5, 2, 7]])        # eos (2) is the second token
    assert finished == [seq] and seq.output_token_ids == [9, 5, 2]
    assert out.scheduled[0].num_appended == 2 and not seq.block_table
    sched.check_invariants()


def test_update_rejects_more_tokens_than_rows():
    sched = make_scheduler()
    decode_ready(sched, [5, 6, 7, 9, 5, 6, 7], max_tokens=20)
    out = sched.schedule()
    with pytest.raises(ValueError, match="sampled rows"):
        sched.update(out, [[5, 6, 7, 9, 4, 4]])


def test_no_draft_slots_when_blocks_run_out():
    sched = make_scheduler(num_blocks=4)                                  # 16 slots
    seq = decode_ready(sched, [5, 6, 7, 9, 5, 6, 7], max_tokens=20)       # 8 tokens in 2 blocks
    other = Sequence(99, "other", 0, [3] * 8, SamplingParams())
    assert sched.block_manager.ensure_slots(other, 8)                     # holds the other 2 blocks
    out = sched.schedule()
    (item,) = out.scheduled
    assert item.spec_token_ids == [] and item.num_new_tokens == 1         # drafts dropped ...
    assert not out.preempted and other.block_table                        # ... nobody preempted
