"""SamplingParams: vLLM defaults, validation messages, normalisation."""
import math

import pytest

from ascend_llm.sampling_params import SamplingParams, SamplingType, StructuredOutputsParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.max_tokens == 16 and p.min_tokens == 0
    assert p.seed is None and p.logprobs is None and p.prompt_logprobs is None
    assert p.stop == [] and p.stop_token_ids == []
    assert p.ignore_eos is False and p.skip_special_tokens is True
    assert p.spaces_between_special_tokens is True and p.detokenize is True
    assert p.include_stop_str_in_output is False
    assert p.sampling_type == SamplingType.RANDOM and not p.is_greedy


_BAD_VALUES = [
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("temperature", -0.5),
    ("temperature", "hot"),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_p", math.nan),
    ("top_p", -0.1),
    ("top_k", -2),
    ("top_k", 2.5),
    ("top_k", "5"),
    ("min_p", -0.1),
    ("min_p", 1.01),
    ("min_p", math.inf),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", math.nan),
    ("presence_penalty", 2.5),
    ("presence_penalty", -2.01),
    ("presence_penalty", -math.inf),
    ("frequency_penalty", 3.0),
    ("frequency_penalty", math.nan),
    ("n", 0),
    ("n", 129),
    ("n", 1.5),
    ("max_tokens", 0),
    ("max_tokens", -1),
    ("min_tokens", -1),
    ("logprobs", -1),
    ("logprobs", 21),
    ("prompt_logprobs", 21),
    ("seed", 1.5),
    ("seed", "42"),
    ("seed", 2 ** 63),            # int64, as vLLM (a torch generator would take up to 2**64 - 1)
    ("seed", -(2 ** 63) - 1),
    ("stop", ""),
    ("stop", ["ok", ""], "''"),
    ("stop", [3], "3"),
    ("stop_token_ids", [5, -1], "-1"),
    ("stop_token_ids", [1.5], "1.5"),
    ("ignore_eos", "yes"),
    ("detokenize", None),
]


@pytest.mark.parametrize("case", _BAD_VALUES, ids=lambda c: f"{c[0]}={c[1]!r}")
def test_bad_value_raises_naming_field_and_value(case):
    field_name, value = case[0], case[1]
    shown = case[2] if len(case) > 2 else repr(value)   # list fields show the bad element
    with pytest.raises(ValueError) as info:
        SamplingParams(**{field_name: value})
    message = str(info.value)
    assert message.startswith(f"{field_name}:"), message
    assert f"got {shown}" in message, message


def test_min_tokens_above_max_tokens_raises():
    with pytest.raises(ValueError, match=r"^min_tokens: .*got 9"):
        SamplingParams(max_tokens=8, min_tokens=9)
    assert SamplingParams(max_tokens=8, min_tokens=8).min_tokens == 8
    assert SamplingParams(max_tokens=None, min_tokens=1000).min_tokens == 1000


def test_boundary_values_accepted():
    p = SamplingParams(temperature=0.0, top_p=1.0, min_p=1.0, presence_penalty=-2.0,
                       frequency_penalty=2.0, repetition_penalty=0.01, n=128,
                       logprobs=20, prompt_logprobs=0, seed=0, top_k=1, max_tokens=1)
    assert p.n == 128 and p.logprobs == 20 and p.top_k == 1


def test_normalisation():
    p = SamplingParams(stop="###", stop_token_ids=(7, 9), top_k=-1, ignore_eos=1,
                       temperature=1, detokenize=0)
    assert p.stop == ["###"]
    assert p.stop_token_ids == [7, 9]
    assert p.top_k == 0
    assert p.ignore_eos is True and p.detokenize is False
    assert isinstance(p.temperature, float) and p.temperature == 1.0
    assert SamplingParams(stop=["a", "bc"]).stop == ["a", "bc"]


def test_sampling_type_and_greedy_threshold():
    assert SamplingParams(temperature=0.0).sampling_type == SamplingType.GREEDY
    assert SamplingParams(temperature=9e-6).is_greedy
    assert not SamplingParams(temperature=1e-4).is_greedy
    assert SamplingParams(temperature=0.8, seed=3).sampling_type == SamplingType.RANDOM_SEED
    assert SamplingParams(temperature=0.0, seed=3).sampling_type == SamplingType.GREEDY


def test_has_penalties():
    assert not SamplingParams().has_penalties
    assert SamplingParams(repetition_penalty=1.1).has_penalties
    assert SamplingParams(presence_penalty=-0.5).has_penalties
    assert SamplingParams(frequency_penalty=0.5).has_penalties


def test_stop_str_buffer_length():
    assert SamplingParams(stop=["ab", "wxyz"]).stop_str_buffer_length == 3
    assert SamplingParams(stop=["ab", "wxyz"], include_stop_str_in_output=True).stop_str_buffer_length == 0
    assert SamplingParams().stop_str_buffer_length == 0


def test_clone_is_deep_and_equal():
    p = SamplingParams(stop=["x"], stop_token_ids=[3], seed=11, temperature=0.5)
    q = p.clone()
    assert q == p and q is not p
    q.stop.append("y")
    q.stop_token_ids.append(4)
    q.seed = 12
    assert p.stop == ["x"] and p.stop_token_ids == [3] and p.seed == 11


def test_from_dict_aliases_and_none():
    p = SamplingParams.from_dict({"max_new_tokens": 40, "temperature": None, "top_k": 5,
                                  "stop": "END"})
    assert p.max_tokens == 40 and p.temperature == 1.0 and p.top_k == 5 and p.stop == ["END"]
    with pytest.raises(ValueError, match="^bogus:"):
        SamplingParams.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="^max_tokens:"):
        SamplingParams.from_dict({"max_new_tokens": 0})


def test_seed_of_the_last_of_n_outputs_must_fit_int64():
    assert SamplingParams(seed=2 ** 63 - 2, n=2).seed == 2 ** 63 - 2
    assert SamplingParams(seed=-(2 ** 63), n=3).seed == -(2 ** 63)
    with pytest.raises(ValueError, match=r"^seed: seed \+ n - 1"):
        SamplingParams(seed=2 ** 63 - 2, n=3)


# ---------------------------------------------------------------- logit_bias / allowed_token_ids / structured outputs
@pytest.mark.parametrize("kwargs, message", [
    (dict(logit_bias={"5": 1.0}), "logit_bias: keys must be non-negative integer token ids"),
    (dict(logit_bias={5: 100.5}), r"logit_bias: bias of token 5 must be in \[-100, 100\]"),
    (dict(logit_bias={5: float("nan")}), "logit_bias: must be a finite number"),
    (dict(allowed_token_ids=[]), "allowed_token_ids: must be a non-empty list"),
    (dict(allowed_token_ids=[1, -2]), "allowed_token_ids: token ids must be non-negative"),
    (dict(structured_outputs={"json": {}, "regex": "a"}), "structured_outputs: exactly one of"),
    (dict(structured_outputs={"choice": ["a", 3]}), "structured_outputs: choice must be"),
    (dict(structured_outputs={"json": "{not json"}), "structured_outputs: json is not valid JSON"),
    (dict(structured_outputs={"schema": {}}), r"structured_outputs: unknown field\(s\) \['schema'\]"),
])
def test_token_constraints_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_structured_outputs_kind_and_cache_key():
    spec = SamplingParams(structured_outputs={"json": '{"b": 1, "a": 2}'}).structured_outputs
    assert isinstance(spec, StructuredOutputsParams) and spec.kind == "json"
    assert spec.key == StructuredOutputsParams(json={"a": 2, "b": 1}).key
    assert StructuredOutputsParams(json_object=True).kind == "json_object"
    assert SamplingParams(allowed_token_ids=[5, 3, 5]).allowed_token_ids == [3, 5]
