"""Per-request sampling parameters (vLLM field names and defaults).

Bad values raise ValueError whose message starts with the field name and shows
the offending value, e.g. ``temperature: must be a finite number, got nan``.
"""
from __future__ import annotations

import copy
import enum
import json
import math
import numbers
from dataclasses import dataclass, fields
from typing import Any, Mapping

# temperatures below this are treated as greedy (vLLM's _SAMPLING_EPS)
SAMPLING_EPS = 1e-5
MAX_N = 128
MAX_LOGPROBS = 20
# seeds are int64 like vLLM's (torch generators take them); output i uses seed + i
SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 63 - 1

# alternative spellings accepted by `SamplingParams.from_dict` (FastDeploy / HF generate)
_FIELD_ALIASES = {
    "max_new_tokens": "max_tokens",
    "min_new_tokens": "min_tokens",
}

# OpenAI's logit_bias range
LOGIT_BIAS_MIN, LOGIT_BIAS_MAX = -100.0, 100.0

_BOOL_FIELDS = ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
                "include_stop_str_in_output", "detokenize", "return_embedding")


class SamplingType(enum.IntEnum):
    """How the sampler picks a sequence's next token."""
    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


def _fail(name: str, message: str, value: Any) -> None:
    raise ValueError(f"{name}: {message}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _finite_float(name: str, value: Any) -> float:
    """`value` as a float; rejects bools, non-numbers, NaN and +-inf."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        _fail(name, "must be a finite number", value)
    result = float(value)
    if not math.isfinite(result):
        _fail(name, "must be a finite number", value)
    return result


def _int_or_none(name: str, value: Any, low: int | None = None,
                 high: int | None = None) -> int | None:
    """`value` as an int in [low, high] (bounds optional); None passes through."""
    if value is None:
        return None
    return _int_in_range(name, value, low, high)


def _int_in_range(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    if not _is_int(value):
        _fail(name, "must be an integer", value)
    result = int(value)
    if low is not None and result < low:
        _fail(name, f"must be >= {low}", value)
    if high is not None and result > high:
        _fail(name, f"must be <= {high}", value)
    return result


def _as_bool(name: str, value: Any) -> bool:
    """Accepts True/False (and 0/1, numpy bools); anything else is an error."""
    if isinstance(value, str) or value not in (True, False):
        _fail(name, "must be a bool", value)
    return bool(value)


def _normalise_stop(value: Any) -> list[str]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        _fail("stop", "must be a string or a list of strings", value)
    for item in items:
        if not isinstance(item, str) or item == "":
            _fail("stop", "stop strings must be non-empty strings", item)
    return list(items)


def _normalise_stop_token_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if not isinstance(value, (list, tuple, set, frozenset)):
        _fail("stop_token_ids", "must be a list of token ids", value)
    result = []
    for item in value:
        if not _is_int(item) or item < 0:
            _fail("stop_token_ids", "token ids must be non-negative integers", item)
        result.append(int(item))
    return result


def _normalise_logit_bias(value: Any) -> dict[int, float] | None:
    """{token id: bias}: int ids (>= 0), finite biases in [-100, 100]. Vocabulary bounds are the
    engine's check (it knows the vocabulary)."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        _fail("logit_bias", "must be a mapping of token id to bias", value)
    result: dict[int, float] = {}
    for key, bias in value.items():
        if not _is_int(key) or key < 0:
            _fail("logit_bias", "keys must be non-negative integer token ids", key)
        bias = _finite_float("logit_bias", bias)
        if not LOGIT_BIAS_MIN <= bias <= LOGIT_BIAS_MAX:
            _fail("logit_bias", f"bias of token {key} must be in [{LOGIT_BIAS_MIN:g}, {LOGIT_BIAS_MAX:g}]", bias)
        result[int(key)] = bias
    return result or None


def _normalise_allowed_token_ids(value: Any) -> list[int] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple, set, frozenset)) or not value:
        _fail("allowed_token_ids", "must be a non-empty list of token ids", value)
    for item in value:
        if not _is_int(item) or item < 0:
            _fail("allowed_token_ids", "token ids must be non-negative integers", item)
    return sorted({int(item) for item in value})


_STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass
class StructuredOutputsParams:
    """Constrain a request's output (vLLM's `StructuredOutputsParams`); exactly one kind is set.

    `json`: a JSON schema (dict or JSON text); `regex`: a regular expression; `choice`: one of
    these strings; `grammar`: an EBNF grammar (root rule `root`); `json_object`: any JSON object.
    """
    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        self.json_object = _as_bool("structured_outputs.json_object", self.json_object)
        set_kinds = [k for k in _STRUCTURED_KINDS if getattr(self, k) not in (None, False)]
        if len(set_kinds) != 1:
            _fail("structured_outputs", f"exactly one of {list(_STRUCTURED_KINDS)} must be set", set_kinds)
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except json.JSONDecodeError as exc:
                _fail("structured_outputs", f"json is not valid JSON ({exc})", self.json)
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            _fail("structured_outputs", "json must be a JSON schema object", self.json)
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                _fail("structured_outputs", f"{name} must be a non-empty string", value)
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or not all(isinstance(c, str) and c for c in self.choice)):
                _fail("structured_outputs", "choice must be a non-empty list of non-empty strings", self.choice)
            self.choice = list(self.choice)

    @property
    def kind(self) -> str:
        """Which of json / regex / choice / grammar / json_object is set."""
        return next(k for k in _STRUCTURED_KINDS if getattr(self, k) not in (None, False))

    @property
    def key(self) -> tuple[str, str]:
        """(kind, canonical spec): equal keys compile to the same grammar."""
        kind = self.kind
        value = getattr(self, kind)
        return kind, json.dumps(value, sort_keys=True) if kind in ("json", "choice") else str(value)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StructuredOutputsParams":
        """From a request object; unknown keys raise ValueError naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            _fail("structured_outputs", f"unknown field(s) {unknown}; supported: {sorted(known)}", dict(data))
        return cls(**{k: v for k, v in data.items() if v is not None})


def _as_structured_outputs(value: Any) -> StructuredOutputsParams | None:
    if value is None or isinstance(value, StructuredOutputsParams):
        return value
    if isinstance(value, Mapping):
        return StructuredOutputsParams.from_dict(value)
    _fail("structured_outputs", "must be a StructuredOutputsParams or a mapping", value)


@dataclass
class SamplingParams:
    """Sampling parameters for one request (vLLM-compatible).

    `top_k` of 0 or -1 disables top-k (-1 is stored as 0). `best_of` is accepted
    and ignored. `logprobs=k` returns the sampled token's logprob plus the k most
    likely tokens' per generated token; `logprobs=0` only the sampled token's.
    With n > 1 and a seed, output i is sampled with seed `seed + i`.
    `logit_bias` ({token id: bias in [-100, 100]}) is added to the logits and `allowed_token_ids`
    masks every other token, both before temperature; `structured_outputs` constrains the output
    to a JSON schema, regex, choice or grammar (vLLM's names). Token ids are checked against the
    vocabulary by the engine.
    """
    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    detokenize: bool = True
    return_embedding: bool = False   # also return the last prompt token's final hidden state (LAST pooling)
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        self._validate_floats()
        self._validate_ints()
        self.logit_bias = _normalise_logit_bias(self.logit_bias)
        self.allowed_token_ids = _normalise_allowed_token_ids(self.allowed_token_ids)
        self.structured_outputs = _as_structured_outputs(self.structured_outputs)
        self.stop = _normalise_stop(self.stop)
        self.stop_token_ids = _normalise_stop_token_ids(self.stop_token_ids)
        for name in _BOOL_FIELDS:
            setattr(self, name, _as_bool(name, getattr(self, name)))

    def _validate_floats(self) -> None:
        self.temperature = _finite_float("temperature", self.temperature)
        self.top_p = _finite_float("top_p", self.top_p)
        self.min_p = _finite_float("min_p", self.min_p)
        self.repetition_penalty = _finite_float("repetition_penalty", self.repetition_penalty)
        self.presence_penalty = _finite_float("presence_penalty", self.presence_penalty)
        self.frequency_penalty = _finite_float("frequency_penalty", self.frequency_penalty)
        if self.temperature < 0.0:
            _fail("temperature", "must be non-negative", self.temperature)
        if not 0.0 < self.top_p <= 1.0:
            _fail("top_p", "must be in (0, 1]", self.top_p)
        if not 0.0 <= self.min_p <= 1.0:
            _fail("min_p", "must be in [0, 1]", self.min_p)
        if self.repetition_penalty <= 0.0:
            _fail("repetition_penalty", "must be > 0", self.repetition_penalty)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                _fail(name, "must be in [-2, 2]", value)

    def _validate_ints(self) -> None:
        self.n = _int_in_range("n", self.n, 1, MAX_N)
        self.top_k = _int_in_range("top_k", self.top_k, -1)
        if self.top_k == -1:
            self.top_k = 0
        self.max_tokens = _int_or_none("max_tokens", self.max_tokens, 1)
        self.min_tokens = _int_in_range("min_tokens", self.min_tokens, 0, self.max_tokens)
        self.logprobs = _int_or_none("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        self.prompt_logprobs = _int_or_none("prompt_logprobs", self.prompt_logprobs,
                                            0, MAX_LOGPROBS)
        self.seed = _int_or_none("seed", self.seed, SEED_MIN, SEED_MAX)
        if self.seed is not None and self.seed + self.n - 1 > SEED_MAX:
            _fail("seed", f"seed + n - 1 (the seed of the last of n={self.n} outputs) must be "
                          f"<= {SEED_MAX}", self.seed)
        if self.best_of is not None and not _is_int(self.best_of):
            _fail("best_of", "must be an integer", self.best_of)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SamplingParams":
        """Build from a request dict: None values mean "default", and FastDeploy /
        HF spellings (`max_new_tokens`, `min_new_tokens`) are accepted. Unknown keys
        raise ValueError."""
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            name = _FIELD_ALIASES.get(key, key)
            if name not in known:
                raise ValueError(f"{key}: unknown sampling parameter")
            if value is not None:
                kwargs[name] = value
        return cls(**kwargs)

    @property
    def sampling_type(self) -> SamplingType:
        if self.temperature < SAMPLING_EPS:
            return SamplingType.GREEDY
        if self.seed is not None:
            return SamplingType.RANDOM_SEED
        return SamplingType.RANDOM

    @property
    def is_greedy(self) -> bool:
        return self.sampling_type == SamplingType.GREEDY

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    @property
    def stop_str_buffer_length(self) -> int:
        """Characters of decoded text to hold back so a partial stop string is never streamed."""
        if not self.stop or self.include_stop_str_in_output:
            return 0
        return max(len(s) for s in self.stop) - 1

    def clone(self) -> "SamplingParams":
        """A deep copy (safe to mutate, e.g. to set a per-child seed)."""
        return copy.deepcopy(self)
