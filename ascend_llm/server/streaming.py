"""Server-sent events and incremental text: what each streamed chunk adds to a choice."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from ascend_llm.outputs import CompletionOutput
from ascend_llm.server.errors import APIError

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = "data: [DONE]\n\n"
_REPLACEMENT = "\ufffd"
# Characters JSON leaves raw that str.splitlines() treats as line breaks (NEL, LINE / PARAGRAPH
# SEPARATOR): clients that split an SSE stream that way (httpx `aiter_lines`, many others) would
# cut the `data:` line inside a JSON string. Written as JSON escapes they decode to the same text.
_LINE_BREAKS_IN_JSON = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse_data(payload: str) -> str:
    """One SSE event carrying the JSON text `payload` on a single line, for any line splitter."""
    return f"data: {payload.translate(_LINE_BREAKS_IN_JSON)}\n\n"


def sse(chunk: BaseModel) -> str:
    return sse_data(chunk.model_dump_json(exclude_none=True))


def sse_error(exc: APIError) -> str:
    return sse_data(json.dumps(exc.body()))


@dataclass
class ChoiceDelta:
    """What a choice gained since the previous chunk."""
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Any]] | None
    finish_reason: str | None
    stop_reason: int | str | None


class DeltaTracker:
    """Tracks how much of one choice's cumulative output has been sent.

    Until the choice finishes, text that may still change is held back: a trailing
    U+FFFD (an incomplete UTF-8 sequence) and the last `holdback` characters (a stop
    string could be forming there; the engine cuts it once it completes).
    """

    def __init__(self, holdback: int = 0) -> None:
        self.holdback = holdback
        self.sent_chars = 0
        self.sent_tokens = 0
        self.finished = False

    def advance(self, out: CompletionOutput) -> ChoiceDelta | None:
        """The delta of `out` over what was sent; None if nothing new (or already finished)."""
        if self.finished:
            return None
        done = out.finish_reason is not None
        visible = out.text if done else _stable_prefix(out.text, self.holdback)
        text = visible[self.sent_chars:] if len(visible) > self.sent_chars else ""
        new_ids = out.token_ids[self.sent_tokens:]
        logprobs = out.logprobs[self.sent_tokens:] if out.logprobs is not None else None
        if not text and not new_ids and not done:
            return None
        self.sent_chars = max(self.sent_chars, len(visible))
        self.sent_tokens = len(out.token_ids)
        self.finished = done
        return ChoiceDelta(text, new_ids, logprobs, out.finish_reason, out.stop_reason)


def _stable_prefix(text: str, holdback: int) -> str:
    end = len(text) - holdback if holdback > 0 else len(text)
    end = max(0, end)
    while end > 0 and text[end - 1] == _REPLACEMENT:
        end -= 1
    return text[:end]
