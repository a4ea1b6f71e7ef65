"""Request fields that constrain the output, turned into SamplingParams arguments.

Structured outputs arrive in one of three spellings (at most one per request): OpenAI's
`response_format` ({"type": "text" | "json_object" | "json_schema", "json_schema": {"schema",
"strict", "name"}}), vLLM's `structured_outputs` object, or vLLM's legacy `guided_json`,
`guided_regex`, `guided_choice`, `guided_grammar`. Errors name the field the client used.
`logit_bias` arrives with string keys (JSON objects have no integer keys).
"""
from __future__ import annotations

from typing import Any

from ascend_llm.sampling_params import StructuredOutputsParams
from ascend_llm.server.errors import bad_request, check_keys

GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}
GUIDED_BACKENDS = ("xgrammar", "auto")
_UNSUPPORTED = ("guided_whitespace_pattern",)
# OpenAI's ResponseFormatText / JSONObject / JSONSchema keys (vLLM's protocol.py ResponseFormat)
_FORMAT_KEYS = {"text": {"type"}, "json_object": {"type"}, "json_schema": {"type", "json_schema"}}
_JSON_SCHEMA_KEYS = {"name", "description", "schema", "strict"}


def structured_source(req: Any) -> str | None:
    """The request field that carries the structured-output spec (None: no constraint); 400 if
    several do."""
    sources = [name for name in ("structured_outputs", *GUIDED_FIELDS) if getattr(req, name, None) is not None]
    fmt = getattr(req, "response_format", None)
    if fmt is not None and _format_type(fmt) != "text":
        sources.insert(0, "response_format")
    if len(sources) > 1:
        raise bad_request(f"{sources[1]}: only one of response_format, structured_outputs and guided_* may be "
                          f"set, got {sources}", sources[1])
    return sources[0] if sources else None


def structured_outputs(req: Any) -> StructuredOutputsParams | None:
    """The request's structured-output spec; 400 naming the field when it is malformed."""
    _check_backend(req)
    for name in _UNSUPPORTED:
        if getattr(req, name, None) is not None:
            raise bad_request(f"{name}: not supported", name)
    source = structured_source(req)
    if source is None:
        return None
    try:
        return _spec(req, source)
    except ValueError as exc:
        detail = str(exc).removeprefix("structured_outputs:").strip()
        raise bad_request(f"{source}: {detail}", source) from None


def structured_renames(req: Any) -> dict[str, str]:
    """Engine error parameter -> the request field to name (compilation errors)."""
    source = structured_source(req)
    return {"structured_outputs": source} if source not in (None, "structured_outputs") else {}


def _spec(req: Any, source: str) -> StructuredOutputsParams:
    value = getattr(req, source)
    if source == "response_format":
        return _from_response_format(value)
    if source == "structured_outputs":
        if not isinstance(value, dict):
            raise ValueError(f"structured_outputs: must be an object, got {value!r}")
        return StructuredOutputsParams.from_dict(value)
    return StructuredOutputsParams(**{GUIDED_FIELDS[source]: value})


def _format_type(fmt: Any) -> Any:
    if not isinstance(fmt, dict):
        raise bad_request(f"response_format: must be an object, got {fmt!r}", "response_format")
    kind = fmt.get("type")
    check_keys(fmt, _FORMAT_KEYS.get(kind, {"type"}), "response_format")
    return kind


def _from_response_format(fmt: dict[str, Any]) -> StructuredOutputsParams:
    kind = fmt.get("type")
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind != "json_schema":
        raise ValueError(f"type must be one of 'text', 'json_object', 'json_schema', got {kind!r}")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise ValueError("json_schema: must be an object with a 'schema'")
    check_keys(spec, _JSON_SCHEMA_KEYS, "response_format.json_schema")
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise ValueError(f"json_schema.schema: must be a JSON schema object, got {schema!r}")
    if not isinstance(spec.get("strict", False), (bool, type(None))):
        raise ValueError(f"json_schema.strict: must be a bool, got {spec.get('strict')!r}")
    return StructuredOutputsParams(json=schema)


def _check_backend(req: Any) -> None:
    backend = getattr(req, "guided_decoding_backend", None)
    if backend is not None and backend not in GUIDED_BACKENDS:
        raise bad_request(f"guided_decoding_backend: {backend!r} is not available; this server decodes with "
                          f"one of {list(GUIDED_BACKENDS)}", "guided_decoding_backend")


def logit_bias(req: Any) -> dict[int, float] | None:
    """{token id: bias} from the request's string-keyed logit_bias; 400 for a key that is not an
    integer. The ids and values are checked where every caller's are: SamplingParams (ids >= 0,
    values in [-100, 100]) and the engine (ids inside the vocabulary)."""
    raw = getattr(req, "logit_bias", None)
    if not raw:
        return None
    result: dict[int, float] = {}
    for key, value in raw.items():
        try:
            result[int(key)] = value
        except (TypeError, ValueError):
            raise bad_request(f"logit_bias: key {key!r} is not an integer token id", "logit_bias") from None
    return result


def constraint_kwargs(req: Any) -> dict[str, Any]:
    """SamplingParams arguments for logit_bias, allowed_token_ids and structured outputs
    (allowed_token_ids is checked by SamplingParams and the engine, as logit_bias's ids)."""
    kwargs = {"logit_bias": logit_bias(req), "allowed_token_ids": getattr(req, "allowed_token_ids", None),
              "structured_outputs": structured_outputs(req)}
    return {name: value for name, value in kwargs.items() if value is not None}
