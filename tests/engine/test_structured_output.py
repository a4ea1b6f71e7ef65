"""Structured outputs, logit_bias and allowed_token_ids through the real engine on the tiny model.

The tiny model's weights are random, so what it writes under a grammar is arbitrary: only the
grammar makes it valid JSON / a regex match / one of the choices. Termination follows vLLM's
xgrammar backend (vllm/v1/structured_output/backend_xgrammar.py): the matcher's stop tokens are
the EOS ids, a completed grammar allows only them, and accepting one terminates the matcher.
"""
from __future__ import annotations

import json
import re

import pytest

from ascend_llm.engine.arg_utils import EngineArgs
from ascend_llm.engine.llm_engine import LLMEngine
from ascend_llm.engine.scheduler import ScheduledSequence, SchedulerOutput
from ascend_llm.engine.sequence import Sequence
from ascend_llm.engine.structured_output import StructuredOutputManager
from ascend_llm.ops.cpu_logits import unpack_token_bitmask
from ascend_llm.sampling_params import SamplingParams, StructuredOutputsParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "tags": {"type": "array", "items": {"enum": ["red", "green"]}, "maxItems": 2},
        "inner": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                  "additionalProperties": False},
    },
    "required": ["name", "tags", "inner"],
    "additionalProperties": False,
}


def _valid(doc: dict) -> bool:
    return (set(doc) == {"name", "tags", "inner"} and isinstance(doc["name"], str) and len(doc["name"]) <= 6
            and isinstance(doc["tags"], list) and len(doc["tags"]) <= 2
            and all(t in ("red", "green") for t in doc["tags"])
            and doc["inner"].keys() == {"ok"} and isinstance(doc["inner"]["ok"], bool))


@pytest.fixture(scope="module")
def engine(tiny_llama_dir) -> LLMEngine:
    return LLMEngine(EngineArgs(model=str(tiny_llama_dir), max_model_len=256, device="cpu", max_num_seqs=16,
                                kv_cache_memory_gb=0.05))


def run(engine: LLMEngine, requests: dict[str, SamplingParams], prompt: str = "The quick brown fox"):
    """Add every request, step until all finish; request id -> final RequestOutput."""
    for rid, params in requests.items():
        engine.add_request(rid, prompt, params)
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    return final


def test_json_schema_sampled_outputs_all_validate(engine):
    params = SamplingParams(n=8, temperature=1.0, seed=3, max_tokens=200,
                            structured_outputs=StructuredOutputsParams(json=SCHEMA))
    out = run(engine, {"j": params})["j"]
    for completion in out.outputs:
        assert completion.finish_reason == "stop", completion
        assert _valid(json.loads(completion.text)), completion.text
    assert not engine.structured_output.matchers          # released with the request


def test_regex_choice_and_an_unconstrained_neighbour(engine):
    plain = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    alone = run(engine, {"alone": plain})["alone"].outputs[0].token_ids
    outs = run(engine, {
        "regex": SamplingParams(temperature=1.0, seed=1, max_tokens=20,
                                structured_outputs=StructuredOutputsParams(regex=r"[a-c]{3}-\d\d")),
        "choice": SamplingParams(temperature=0.0, max_tokens=20,
                                 structured_outputs=StructuredOutputsParams(choice=["lazy dog", "fox"])),
        "plain": plain,
    })
    assert re.fullmatch(r"[a-c]{3}-\d\d", outs["regex"].outputs[0].text)
    assert outs["choice"].outputs[0].text in ("lazy dog", "fox")
    assert outs["plain"].outputs[0].token_ids == alone    # a grammar row does not touch the others


def test_grammar_terminating_without_eos_finishes_as_stop(engine):
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=30, ignore_eos=True,
                            structured_outputs=StructuredOutputsParams(grammar='root ::= "ab" [0-9]'))
    completion = run(engine, {"g": params})["g"].outputs[0]
    assert re.fullmatch(r"ab[0-9]", completion.text) and completion.finish_reason == "stop"


@pytest.mark.parametrize("spec", [StructuredOutputsParams(json={"type": "nonsense"}),
                                  StructuredOutputsParams(regex="(unclosed"),
                                  StructuredOutputsParams(grammar="root ::= ")])
def test_a_spec_that_does_not_compile_is_a_value_error(engine, spec):
    with pytest.raises(ValueError, match=r"^structured_outputs: the .* does not compile"):
        engine.add_request("bad", "hi", SamplingParams(structured_outputs=spec))
    assert "bad" not in engine.requests


def test_structured_outputs_with_speculative_decoding_is_refused(engine, monkeypatch):
    monkeypatch.setattr(engine, "speculative_config", object())
    with pytest.raises(ValueError, match="speculative decoding"):
        engine.add_request("spec", "hi", SamplingParams(structured_outputs=StructuredOutputsParams(regex="a")))


def test_logit_bias_forces_a_token_and_allowed_token_ids_restrict(engine):
    outs = run(engine, {
        "bias": SamplingParams(temperature=1.0, seed=0, max_tokens=6, ignore_eos=True, logit_bias={42: 100}),
        "allowed": SamplingParams(temperature=1.0, seed=0, max_tokens=12, ignore_eos=True,
                                  allowed_token_ids=[7, 50, 51]),
        "ban": SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
    })
    assert outs["bias"].outputs[0].token_ids == [42] * 6
    assert set(outs["allowed"].outputs[0].token_ids) <= {7, 50, 51}
    greedy = outs["ban"].outputs[0].token_ids
    banned = run(engine, {"ban2": SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True,
                                                 logit_bias={greedy[0]: -100})})["ban2"]
    assert banned.outputs[0].token_ids[0] != greedy[0]


@pytest.mark.parametrize("params, message", [
    (dict(logit_bias={384: 1.0}), r"logit_bias: token id 384 is outside the vocabulary \(vocab size 384"),
    (dict(allowed_token_ids=[3, 1000]), r"allowed_token_ids: token id 1000 is outside the vocabulary"),
])
def test_token_ids_outside_the_vocabulary_are_refused(engine, params, message):
    with pytest.raises(ValueError, match=message):
        engine.add_request("oov", "hi", SamplingParams(**params))


def test_compiled_grammars_are_an_lru_of_bounded_size(engine, monkeypatch):
    compiler = engine.structured_output.compiler
    monkeypatch.setattr(compiler, "cache_size", 2)
    first = compiler.compile(StructuredOutputsParams(regex="lru-a"))
    assert compiler.compile(StructuredOutputsParams(regex="lru-a")) is first       # hit
    compiler.compile(StructuredOutputsParams(regex="lru-b"))
    compiler.compile(StructuredOutputsParams(regex="lru-c"))                        # evicts lru-a
    assert compiler.num_cached == 2
    assert compiler.compile(StructuredOutputsParams(regex="lru-a")) is not first


def test_logits_wider_than_the_tokenizer_never_allow_the_padding_ids(engine):
    """A model whose vocab_size (logits width) exceeds the tokenizer's: xgrammar's TokenizerInfo is
    built with the model's size, so ids past the tokenizer are masked for grammar rows."""
    manager = StructuredOutputManager(engine.tokenizer, 400, {2})
    seq = Sequence(0, "wide", 0, [1, 5], SamplingParams(structured_outputs=StructuredOutputsParams(json_object=True)))
    manager.add_seqs([seq])
    grammar = manager.bitmask(SchedulerOutput([ScheduledSequence(seq, 0, 2, True)]))
    assert grammar.bitmask.shape == (1, 13) and grammar.rows == {0: 0}     # ceil(400 / 32) words
    allowed = unpack_token_bitmask(grammar.bitmask, 416)[0]
    assert allowed[:384].any() and not allowed[384:].any()
    assert manager.accept(seq, [engine.tokenizer.convert_tokens_to_ids("{")]) is None
    assert manager.accept(seq, [engine.tokenizer.convert_tokens_to_ids("x")]) is not None  # not JSON here
