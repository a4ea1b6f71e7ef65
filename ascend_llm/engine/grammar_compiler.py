"""Compiling structured-output specs into xgrammar grammars, once per spec (bounded LRU cache).

One `GrammarCompiler` per engine, built on first use from the model's tokenizer with the model's
vocabulary size (the logits may be wider than the tokenizer's vocabulary: xgrammar's
TokenizerInfo pads the extra ids, which are never allowed). `compile` is thread-safe: the async
engine calls it on a worker thread before a request enters the engine loop, so a slow schema never
stalls the other requests' steps; the engine's own call is then a cache hit.
"""
from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from typing import Any, Iterable

import xgrammar as xgr

from ascend_llm.sampling_params import StructuredOutputsParams

logger = logging.getLogger(__name__)

DEFAULT_CACHE_SIZE = 256
# JSON whitespace: any, but at most this many characters in a row, so a sampled run of spaces or
# newlines cannot eat the whole token budget (xgrammar's max_whitespace_cnt)
MAX_JSON_WHITESPACE = 16
_ANY_JSON_OBJECT = {"type": "object"}


class GrammarCompiler:
    """Compiles `StructuredOutputsParams` to `xgr.CompiledGrammar` (cached by kind and spec)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Iterable[int],
                 cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self.cache_size = cache_size
        self._compiler: xgr.GrammarCompiler | None = None
        self._cache: OrderedDict[tuple[str, str], xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()             # the cache
        self._init_lock = threading.Lock()        # building the xgrammar compiler (once, can be slow)

    def compile(self, spec: StructuredOutputsParams) -> xgr.CompiledGrammar:
        """The compiled grammar of `spec`; ValueError("structured_outputs: ...") if it does not
        compile (an invalid schema, regex, grammar or choice list)."""
        key = spec.key
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        compiled = self._compile(spec)
        with self._lock:
            self._cache[key] = compiled
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    @property
    def num_cached(self) -> int:
        return len(self._cache)

    def _xgr_compiler(self) -> xgr.GrammarCompiler:
        with self._init_lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self.stop_token_ids or None)
                self._compiler = xgr.GrammarCompiler(info, cache_enabled=False)
                logger.info("xgrammar compiler ready (vocab_size=%d, stop tokens %s)", self.vocab_size,
                            self.stop_token_ids)
            return self._compiler

    def _compile(self, spec: StructuredOutputsParams) -> xgr.CompiledGrammar:
        compiler = self._xgr_compiler()
        kind = spec.kind
        try:
            if kind == "json" or kind == "json_object":
                schema = bounded_strings_as_patterns(spec.json) if kind == "json" else _ANY_JSON_OBJECT
                return compiler.compile_json_schema(json.dumps(schema), any_whitespace=True,
                                                    max_whitespace_cnt=MAX_JSON_WHITESPACE)
            if kind == "regex":
                return compiler.compile_regex(spec.regex)
            if kind == "choice":
                return compiler.compile_grammar(choice_grammar(spec.choice))
            return compiler.compile_grammar(spec.grammar)
        except Exception as exc:     # xgrammar raises RuntimeError / ValueError / its own types
            raise ValueError(f"structured_outputs: the {_WHAT[kind]} does not compile: "
                             f"{type(exc).__name__}: {_first_line(exc)}") from None


_WHAT = {"json": "JSON schema", "json_object": "JSON object grammar", "regex": "regex",
         "choice": "choice list", "grammar": "EBNF grammar"}


def bounded_strings_as_patterns(schema: Any) -> Any:
    """A copy of `schema` where each string with minLength / maxLength (and no pattern or format)
    carries the equivalent pattern of JSON-legal unescaped characters.

    xgrammar 0.2.9 lowers a length-bounded string to `[^"\\\r\n]{min,max}`, which admits raw
    control characters (U+0000-U+001F) that no JSON parser accepts; its pattern strings exclude
    them. (Escapes are not generated inside such strings.)
    """
    if isinstance(schema, list):
        return [bounded_strings_as_patterns(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: bounded_strings_as_patterns(value) for key, value in schema.items()}
    bounded = "minLength" in result or "maxLength" in result
    if result.get("type") == "string" and bounded and "pattern" not in result and "format" not in result:
        low, high = result.get("minLength", 0), result.get("maxLength", "")
        if isinstance(low, int) and isinstance(high, (int, str)):
            result["pattern"] = f'^[^"\\\\\\x00-\\x1f]{{{low},{high}}}$'
            result.pop("minLength", None)           # the pattern carries them (xgrammar warns otherwise)
            result.pop("maxLength", None)
    return result


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar whose only sentences are `choices` (JSON string escapes are EBNF's)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


_NATIVE_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")   # "[18:23:36] /project/cpp/x.cc:94: "


def _first_line(exc: Exception) -> str:
    """The first line of xgrammar's message, without its time stamp and C++ source location."""
    text = str(exc).strip()
    return _NATIVE_PREFIX.sub("", text.splitlines()[0]) if text else "invalid"
