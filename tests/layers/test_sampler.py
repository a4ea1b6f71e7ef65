"""Sampler: greedy, top-k/top-p/min-p, temperature statistics, seeds, penalties,
min_tokens and logprobs, checked against hand-written references."""
import itertools
import math

import pytest
import torch

from ascend_llm.engine.sequence import Sequence
from ascend_llm.layers.sampler import (NO_ALLOWED_TOKEN, GrammarBitmask, Sampler, SamplingMetadata,
                                       apply_min_p, apply_penalties, apply_top_k_top_p)
from ascend_llm.sampling_params import SamplingParams

EOS = 2
_ids = itertools.count()


def make_seq(params: SamplingParams, prompt=(5, 6, 7), output=(), index=0) -> Sequence:
    seq = Sequence(seq_id=next(_ids), request_id="r", index=index,
                   prompt_token_ids=list(prompt), sampling_params=params)
    for token in output:
        seq.append_token(token)
    return seq


def run(seqs, logits, generators=None, eos=(EOS,)):
    generators = {} if generators is None else generators
    metadata = SamplingMetadata.build(seqs, eos, generators, logits.device)
    return Sampler()(logits, metadata)


def random_logits(rows, vocab, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=gen) * scale   # [rows, vocab]


# ---------------------------------------------------------------- greedy and filters

def test_greedy_equals_argmax():
    logits = random_logits(8, 100, seed=1)
    out = run([make_seq(SamplingParams(temperature=0.0)) for _ in range(8)], logits)
    assert out.sampled_token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 8 and out.ranks == [None] * 8
    assert out.sampled_token_tensor.tolist() == out.sampled_token_ids


def test_greedy_rows_exact_in_mixed_batch():
    logits = random_logits(6, 50, seed=2)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.3, top_p=0.9),
              SamplingParams(temperature=0.0), SamplingParams(top_k=4),
              SamplingParams(temperature=0.0, top_k=3, top_p=0.5, min_p=0.3),
              SamplingParams(min_p=0.2, seed=7)]
    out = run([make_seq(p) for p in params], logits)
    expected = logits.argmax(-1).tolist()
    for row in (0, 2, 4):
        assert out.sampled_token_ids[row] == expected[row]


def test_top_k_one_equals_greedy():
    logits = random_logits(16, 64, seed=3, scale=0.5)   # flat: random sampling would differ
    out = run([make_seq(SamplingParams(temperature=1.5, top_k=1)) for _ in range(16)], logits)
    assert out.sampled_token_ids == logits.argmax(-1).tolist()


def test_tiny_top_p_equals_greedy():
    logits = random_logits(16, 64, seed=4, scale=0.5)
    out = run([make_seq(SamplingParams(temperature=1.0, top_p=1e-6)) for _ in range(16)], logits)
    assert out.sampled_token_ids == logits.argmax(-1).tolist()


def test_top_k_with_top_p_one_token_equals_greedy():
    logits = random_logits(8, 64, seed=5, scale=0.5)
    out = run([make_seq(SamplingParams(top_k=10, top_p=1e-6)) for _ in range(8)], logits)
    assert out.sampled_token_ids == logits.argmax(-1).tolist()


def reference_top_k(row: list[float], k: int) -> set[int]:
    kth = sorted(row, reverse=True)[k - 1]
    return {i for i, v in enumerate(row) if v >= kth}


def reference_top_p(row: list[float], p: float) -> set[int]:
    probs = torch.tensor(row, dtype=torch.float64).softmax(-1).tolist()
    order = sorted(range(len(row)), key=lambda i: probs[i], reverse=True)
    kept, mass = set(), 0.0
    for i in order:
        kept.add(i)
        mass += probs[i]
        if mass >= p:
            break
    return kept


def kept_ids(row: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(row)).flatten().tolist())


@pytest.mark.parametrize("with_top_p", [False, True])
def test_top_k_keeps_exactly_k_largest(with_top_p):
    logits = random_logits(4, 30, seed=6)
    top_k = torch.tensor([1, 5, 0, 100])          # 0 disables, 100 > vocab keeps all
    top_p = torch.ones(4) if with_top_p else None
    filtered = apply_top_k_top_p(logits, top_k, top_p, max_top_k=100)
    rows = logits.tolist()
    assert kept_ids(filtered[0]) == reference_top_k(rows[0], 1)
    assert kept_ids(filtered[1]) == reference_top_k(rows[1], 5)
    assert kept_ids(filtered[2]) == set(range(30))
    assert kept_ids(filtered[3]) == set(range(30))
    kept = torch.isfinite(filtered)
    torch.testing.assert_close(filtered[kept], logits[kept], rtol=0, atol=0)


def test_top_p_keeps_smallest_nucleus():
    logits = random_logits(5, 40, seed=7, scale=1.5)
    top_p = torch.tensor([0.1, 0.5, 0.8, 0.95, 1.0])
    filtered = apply_top_k_top_p(logits, None, top_p)
    for row, p in enumerate(top_p.tolist()):
        assert kept_ids(filtered[row]) == reference_top_p(logits[row].tolist(), p)


def test_min_p_filters_below_fraction_of_top_prob():
    logits = random_logits(3, 40, seed=8, scale=1.5)
    min_p = torch.tensor([0.0, 0.1, 0.5])
    filtered = apply_min_p(logits, min_p)
    probs = logits.double().softmax(-1)
    for row, m in enumerate(min_p.tolist()):
        expected = {i for i, q in enumerate(probs[row].tolist()) if q >= m * probs[row].max().item()}
        assert kept_ids(filtered[row]) == expected
    assert len(kept_ids(filtered[2])) < len(kept_ids(filtered[1])) < 40


def test_filter_boundaries_follow_vllm():
    # top-p drops tokens whose ascending cumulative mass is <= 1 - p: 4 equal tokens,
    # p = 0.5 keeps exactly two; min-p keeps tokens with prob >= min_p * max (ties kept)
    uniform = torch.zeros(1, 4)
    assert len(kept_ids(apply_top_k_top_p(uniform, None, torch.tensor([0.5]))[0])) == 2
    tied = torch.tensor([[1.0, 1.0, 0.0]])
    assert kept_ids(apply_min_p(tied, torch.tensor([1.0]))[0]) == {0, 1}


def test_min_p_sampling_only_draws_allowed_tokens():
    logits = random_logits(1, 20, seed=9, scale=1.5).repeat(2000, 1)   # [2000, 20]
    probs = logits[0].softmax(-1)
    allowed = set(torch.nonzero(probs >= 0.3 * probs.max()).flatten().tolist())
    assert 1 < len(allowed) < 20
    torch.manual_seed(0)
    out = run([make_seq(SamplingParams(min_p=0.3)) for _ in range(2000)], logits)
    assert set(out.sampled_token_ids) == allowed


# ---------------------------------------------------------------- sampling statistics

def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    support = expected > 0
    return float(((counts[support] - expected[support]) ** 2 / expected[support]).sum())


# chi-square critical values at p = 0.001 by degrees of freedom
_CHI2_999 = {2: 13.82, 5: 20.52}


def test_temperature_sampling_matches_softmax():
    draws, vocab, temperature = 4000, 6, 0.7
    base = torch.tensor([1.0, 0.5, 0.0, -0.3, 0.8, -1.0])
    logits = base.repeat(draws, 1)                                   # [draws, vocab]
    torch.manual_seed(1234)
    out = run([make_seq(SamplingParams(temperature=temperature)) for _ in range(draws)], logits)
    counts = torch.bincount(torch.tensor(out.sampled_token_ids), minlength=vocab).double()
    probs = (base.double() / temperature).softmax(-1)
    assert chi_square(counts, probs) < _CHI2_999[vocab - 1]


def test_seeded_sampling_over_steps_matches_top_k_distribution():
    steps, vocab = 3000, 8
    base = torch.tensor([0.2, 1.1, -0.4, 0.9, 0.0, 1.4, -1.2, 0.3])
    seq = make_seq(SamplingParams(temperature=1.0, top_k=3, seed=99))
    generators: dict[int, torch.Generator] = {}
    tokens = [run([seq], base.unsqueeze(0), generators).sampled_token_ids[0] for _ in range(steps)]
    counts = torch.bincount(torch.tensor(tokens), minlength=vocab).double()
    top3 = base.topk(3).indices
    probs = torch.zeros(vocab, dtype=torch.float64)
    probs[top3] = base[top3].double().softmax(-1)
    assert set(tokens) == set(top3.tolist())
    assert chi_square(counts, probs) < _CHI2_999[2]


# ---------------------------------------------------------------- seeds

def seeded_run(seq_params, steps, logits_rows, others=()):
    """Tokens of a fresh seeded sequence over `steps`, batched with `others` rows in front."""
    target = make_seq(seq_params)
    other_seqs = [make_seq(p) for p in others]
    generators: dict[int, torch.Generator] = {}
    tokens = []
    for step in range(steps):
        seqs = other_seqs + [target]
        logits = torch.cat([random_logits(len(other_seqs), 32, seed=1000 + step),
                            logits_rows[step:step + 1]])
        tokens.append(run(seqs, logits, generators).sampled_token_ids[-1])
        target.append_token(tokens[-1])
    return tokens, generators, target


def test_seed_reproducible_across_runs_and_state_persists():
    steps = 12
    logits = random_logits(1, 32, seed=10, scale=0.3).repeat(steps, 1)   # same flat logits each step
    params = SamplingParams(temperature=1.0, seed=1234)
    first, generators, target = seeded_run(params, steps, logits)
    second, _, _ = seeded_run(params, steps, logits)
    assert first == second
    assert len(set(first)) > 1          # generator advances: not the same draw every step
    assert list(generators) == [target.seq_id]
    other, _, _ = seeded_run(SamplingParams(temperature=1.0, seed=4321), steps, logits)
    assert other != first


def test_seeded_row_independent_of_batch_composition():
    steps = 8
    logits = random_logits(steps, 32, seed=11, scale=0.5)
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=77)
    alone, _, _ = seeded_run(params, steps, logits)
    crowd = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.0),
             SamplingParams(temperature=0.7, seed=5, top_k=4),
             SamplingParams(temperature=1.2, presence_penalty=0.5)]
    torch.manual_seed(0)
    batched, generators, _ = seeded_run(params, steps, logits, others=crowd)
    torch.manual_seed(1)
    batched_again, _, _ = seeded_run(params, steps, logits, others=crowd[:2])
    assert alone == batched == batched_again
    assert len(generators) == 2          # the two seeded random rows


def test_n_outputs_with_seed_use_distinct_streams():
    logits = random_logits(1, 64, seed=12, scale=0.1).repeat(2, 1)
    params = SamplingParams(n=2, seed=3)
    seqs = [make_seq(params, index=0), make_seq(params, index=1)]
    tokens = []
    generators: dict[int, torch.Generator] = {}
    for _ in range(6):
        tokens.append(run(seqs, logits, generators).sampled_token_ids)
    assert [t[0] for t in tokens] != [t[1] for t in tokens]
    assert set(generators) == {seqs[0].seq_id, seqs[1].seq_id}


# ---------------------------------------------------------------- penalties

def reference_penalties(logits: list[float], prompt: list[int], output: list[int],
                        rep: float, freq: float, pres: float) -> list[float]:
    result = []
    for token, value in enumerate(logits):
        if token in prompt or token in output:
            value = value / rep if value > 0 else value * rep
        count = output.count(token)
        value -= freq * count
        value -= pres * (1.0 if count > 0 else 0.0)
        result.append(value)
    return result


def test_penalties_match_reference_formulas():
    vocab = 10
    logits = random_logits(4, vocab, seed=13)
    cases = [  # prompt, output, repetition, frequency, presence
        ([1, 2, 2], [2, 3, 3, 3], 1.3, 0.5, 0.7),
        ([4, 5], [6, 6, 9], 0.8, -0.4, 1.5),
        ([0, 7], [], 2.0, 1.0, 1.0),
        ([8], [8, 1, 1], 1.0, 0.0, 0.0),       # no penalties on this row: untouched
    ]
    seqs = [make_seq(SamplingParams(repetition_penalty=r, frequency_penalty=f, presence_penalty=p),
                     prompt=prompt, output=output) for prompt, output, r, f, p in cases]
    metadata = SamplingMetadata.build(seqs, [EOS], {}, "cpu")
    penalised = apply_penalties(logits, metadata)
    expected = torch.tensor([reference_penalties(logits[i].tolist(), *case)
                             for i, case in enumerate(cases)])
    torch.testing.assert_close(penalised, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(penalised[3], logits[3], rtol=0, atol=0)


def test_frequency_only_penalty_without_repetition():
    logits = random_logits(1, 6, seed=14)
    seq = make_seq(SamplingParams(frequency_penalty=0.25), prompt=[1], output=[1, 4, 4])
    metadata = SamplingMetadata.build([seq], [EOS], {}, "cpu")
    assert metadata.prompt_token_ids is None and metadata.repetition_penalty is None
    expected = reference_penalties(logits[0].tolist(), [1], [1, 4, 4], 1.0, 0.25, 0.0)
    torch.testing.assert_close(apply_penalties(logits, metadata)[0], torch.tensor(expected))


def test_greedy_uses_penalised_logits():
    logits = torch.tensor([[0.1, 3.0, 2.9, -1.0, 0.5]])
    seq = make_seq(SamplingParams(temperature=0.0, repetition_penalty=1.2), prompt=[0], output=[1])
    assert run([seq], logits).sampled_token_ids == [2]        # 3.0 / 1.2 = 2.5 < 2.9
    plain = make_seq(SamplingParams(temperature=0.0), prompt=[0], output=[1])
    assert run([plain], logits).sampled_token_ids == [1]


def test_input_logits_not_modified():
    logits = random_logits(2, 12, seed=15)
    original = logits.clone()
    seqs = [make_seq(SamplingParams(repetition_penalty=1.5, presence_penalty=1.0, min_tokens=3,
                                    temperature=0.5, top_k=3, top_p=0.9, min_p=0.1),
                     prompt=[1, 2], output=[3]) for _ in range(2)]
    run(seqs, logits)
    assert torch.equal(logits, original)


def test_bf16_logits_are_sampled_in_fp32():
    logits = random_logits(4, 40, seed=16).to(torch.bfloat16)
    out = run([make_seq(SamplingParams(temperature=0.0, logprobs=1)) for _ in range(4)], logits)
    assert out.sampled_token_ids == logits.float().argmax(-1).tolist()


# ---------------------------------------------------------------- min_tokens

def test_min_tokens_masks_eos_and_stop_token_ids():
    logits = torch.tensor([[0.0, 0.5, 9.0, 0.2, 8.0, 7.0]])    # EOS=2 best, then stop id 4
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[4])
    assert run([make_seq(params, output=[1])], logits).sampled_token_ids == [5]
    assert run([make_seq(params, output=[1, 3])], logits).sampled_token_ids == [2]


def test_min_tokens_with_ignore_eos_masks_only_stop_ids():
    logits = torch.tensor([[0.0, 0.5, 9.0, 0.2, 8.0, 7.0]])
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[4], ignore_eos=True)
    assert run([make_seq(params)], logits).sampled_token_ids == [2]
    logits[0, 2] = -1.0
    assert run([make_seq(params)], logits).sampled_token_ids == [5]


def test_min_tokens_never_samples_eos_randomly():
    logits = torch.zeros(500, 4)
    logits[:, EOS] = 5.0                                     # EOS dominant but banned
    torch.manual_seed(3)
    out = run([make_seq(SamplingParams(min_tokens=1)) for _ in range(500)], logits, eos={EOS, 3})
    assert set(out.sampled_token_ids) == {0, 1}


# ---------------------------------------------------------------- logprobs

def test_logprobs_are_raw_log_softmax_with_top_k_and_ranks():
    vocab = 30
    logits = random_logits(3, vocab, seed=17)
    params = [SamplingParams(temperature=0.0, logprobs=3),
              SamplingParams(temperature=0.5, repetition_penalty=1.7, top_k=5, logprobs=5, seed=1),
              SamplingParams(temperature=0.0)]
    seqs = [make_seq(p, prompt=[0, 1, 2, 3]) for p in params]
    out = run(seqs, logits)
    reference = logits.double().log_softmax(-1)
    for row, k in ((0, 3), (1, 5)):
        sampled = out.sampled_token_ids[row]
        order = reference[row].argsort(descending=True).tolist()
        expected_ids = set(order[:k]) | {sampled}
        assert set(out.logprobs[row]) == expected_ids == set(out.ranks[row])
        for token, value in out.logprobs[row].items():
            assert math.isclose(value, reference[row, token].item(), abs_tol=1e-5)
            assert out.ranks[row][token] == order.index(token) + 1
    assert out.ranks[0][out.sampled_token_ids[0]] == 1
    assert out.logprobs[2] is None and out.ranks[2] is None


def test_logprobs_zero_returns_only_sampled_token():
    logits = random_logits(2, 16, seed=18)
    seqs = [make_seq(SamplingParams(temperature=0.0, logprobs=0)),
            make_seq(SamplingParams(temperature=0.0, logprobs=2))]
    out = run(seqs, logits)
    assert list(out.logprobs[0]) == [out.sampled_token_ids[0]]
    assert len(out.logprobs[1]) == 2


def test_logprob_rank_of_unlikely_sampled_token():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    seq = make_seq(SamplingParams(temperature=0.0, logprobs=1, min_tokens=1), output=[])
    out = run([seq], logits, eos={0, 1})                       # bans 0 and 1 -> samples 2
    assert out.sampled_token_ids == [2]
    assert out.ranks[0] == {2: 3, 0: 1}
    reference = logits.log_softmax(-1)[0]
    assert math.isclose(out.logprobs[0][2], reference[2].item(), abs_tol=1e-6)
    assert math.isclose(out.logprobs[0][0], reference[0].item(), abs_tol=1e-6)


def test_empty_batch():
    out = run([], torch.empty(0, 10))
    assert out.sampled_token_ids == [] and out.logprobs == [] and out.ranks == []


# ---------------------------------------------------------------- non-finite rows

@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_non_finite_row_fails_alone(poison):
    """A row with NaN / +inf logits (or all -inf) gets token -1, no logprobs and a reason;
    the other rows get exactly what they get without it (greedy, seeded, logprobs)."""
    logits = random_logits(4, 40, seed=21)
    params = [SamplingParams(temperature=0.0, logprobs=3), SamplingParams(temperature=0.8, seed=9, logprobs=2),
              SamplingParams(temperature=0.8, seed=4, logprobs=1), SamplingParams(temperature=0.0)]
    clean = run([make_seq(p) for p in params], logits)
    bad = logits.clone()
    bad[1, 7] = poison
    bad[3] = float("-inf")
    out = run([make_seq(p) for p in params], bad)
    assert set(out.failed_rows) == {1, 3} and "non-finite" in out.failed_rows[1]
    assert out.sampled_token_ids[1] == out.sampled_token_ids[3] == -1
    assert out.logprobs[1] is None and out.ranks[1] is None
    for row in (0, 2):
        assert out.sampled_token_ids[row] == clean.sampled_token_ids[row]
        assert out.logprobs[row] == clean.logprobs[row] and out.ranks[row] == clean.ranks[row]
    assert clean.failed_rows == {}


# ---------------------------------------------------------------- logit_bias, allowed_token_ids, grammar bitmask

def test_constraints_apply_before_sampling_and_logprobs_stay_raw():
    logits = random_logits(3, 64, seed=7)
    seqs = [make_seq(SamplingParams(temperature=0.0, logprobs=0, logit_bias={9: 100.0})),
            make_seq(SamplingParams(temperature=1.0, seed=3, allowed_token_ids=[4, 5])),
            make_seq(SamplingParams(temperature=0.0, logprobs=0))]
    bitmask = torch.zeros(1, 2, dtype=torch.int32)
    bitmask[0, 1] = 1 << 8                                     # only token 40 is allowed
    grammar = GrammarBitmask(bitmask, {seqs[2].seq_id: 0})
    out = Sampler()(logits, SamplingMetadata.build(seqs, [EOS], {}, "cpu", grammar))
    assert out.sampled_token_ids[0] == 9 and out.sampled_token_ids[1] in (4, 5)
    assert out.sampled_token_ids[2] == 40
    raw = logits.log_softmax(dim=-1)
    assert out.logprobs[2][40] == pytest.approx(raw[2, 40].item())   # from the raw logits


def test_a_row_left_without_any_token_fails_alone():
    seqs = [make_seq(SamplingParams(temperature=0.0, min_tokens=2, max_tokens=4)), make_seq(SamplingParams())]
    bitmask = torch.zeros(1, 2, dtype=torch.int32)
    bitmask[0, 0] = 1 << EOS                                   # the grammar allows only EOS, min_tokens bans it
    out = Sampler()(random_logits(2, 64), SamplingMetadata.build(seqs, [EOS], {}, "cpu",
                                                                 GrammarBitmask(bitmask, {seqs[0].seq_id: 0})))
    assert out.failed_rows == {0: NO_ALLOWED_TOKEN} and out.sampled_token_ids[1] >= 0
