"""Output text of a sequence that an EOS (a special token) ended, with special tokens kept
(`skip_special_tokens=False`, which tool parsers such as mistral's need): the EOS is not text,
as in vLLM's detokenizer; ordinary stop tokens and unfinished sequences keep all their text."""
from __future__ import annotations

import pytest

from ascend_llm.engine.request_state import RequestState
from ascend_llm.engine.sequence import Sequence, SequenceStatus
from ascend_llm.outputs import RequestMetrics
from ascend_llm.sampling_params import SamplingParams
from tests.tiny_models import make_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


PROMPT_TOKENS = 1


def _body(tokenizer) -> str:
    """The text of the output tokens before the last one."""
    return tokenizer.decode(tokenizer.encode("The quick brown fox", add_special_tokens=False)[PROMPT_TOKENS:])


def _text(tokenizer, last: str, status: SequenceStatus, stop_reason=None, **params) -> str:
    sampling = SamplingParams(skip_special_tokens=False, **params)
    ids = tokenizer.encode("The quick brown fox", add_special_tokens=False)
    seq = Sequence(0, "r", 0, ids[:PROMPT_TOKENS], sampling, token_ids=ids + [tokenizer.convert_tokens_to_ids(last)],
                   status=status, stop_reason=stop_reason)
    state = RequestState("r", None, ids[:PROMPT_TOKENS], sampling, [seq], RequestMetrics(0.0))
    state.update_text(seq, tokenizer)
    return state.outputs[0].text


def test_the_eos_that_ended_a_sequence_is_not_text(tokenizer):
    assert _text(tokenizer, "<|im_end|>", SequenceStatus.FINISHED_STOPPED) == _body(tokenizer)


@pytest.mark.parametrize("status,stop_reason,params", [
    (SequenceStatus.RUNNING, None, {}),                        # not the end (ignore_eos, min_tokens)
    (SequenceStatus.FINISHED_LENGTH, None, {}),
    (SequenceStatus.FINISHED_STOPPED, None, {"include_stop_str_in_output": True}),
])
def test_special_tokens_kept_otherwise(tokenizer, status, stop_reason, params):
    assert _text(tokenizer, "<|im_end|>", status, stop_reason, **params) == _body(tokenizer) + "<|im_end|>"


def test_an_ordinary_stop_token_stays_text(tokenizer):
    last = tokenizer.convert_ids_to_tokens(tokenizer.encode("The quick brown fox", add_special_tokens=False))[-1]
    text = _text(tokenizer, last, SequenceStatus.FINISHED_STOPPED, tokenizer.convert_tokens_to_ids(last))
    assert text == _body(tokenizer) + tokenizer.convert_tokens_to_string([last])
