"""The server-sent events of a streamed Responses API call, in OpenAI's order, each
`event: <type>\\ndata: <json>\\n\\n` with a `sequence_number` counting from 0:

    response.created, response.in_progress,
    per message item:  response.output_item.added, response.content_part.added,
                       response.output_text.delta ..., response.output_text.done,
                       response.content_part.done, response.output_item.done
    per function call: response.output_item.added, response.function_call_arguments.delta ...,
                       response.function_call_arguments.done, response.output_item.done
    response.completed (or response.incomplete when max_output_tokens cut the output)

(openai SDK `types/responses/response_stream_event.py`; vLLM serving_responses.py
`_process_simple_streaming_events`). The items the events build are kept, with the same ids, for
the final response object."""
from __future__ import annotations

import json
from typing import Any

from ascend_llm.server.errors import APIError
from ascend_llm.server.protocol import DeltaToolCall
from ascend_llm.server.responses_protocol import (FunctionCallItem, OutputMessage, OutputText, ResponseObject,
                                                  response_item_id)
from ascend_llm.server.streaming import sse_data


class ResponseEventWriter:
    """Turns text and tool-call deltas of one output into Responses events (SSE strings).

    Text that is only whitespace is held back until real text follows, so the blank a tool-call
    format writes before its first call does not open an empty message item."""

    def __init__(self) -> None:
        self.sequence_number = 0
        self.items: list[OutputMessage | FunctionCallItem] = []
        self._open: OutputMessage | FunctionCallItem | None = None
        self._calls: dict[int, FunctionCallItem] = {}       # the parser's call index -> its item
        self._pending = ""                                  # held-back whitespace
        self._logprobs: list[dict[str, Any]] = []           # of tokens whose text is not sent yet

    def event(self, kind: str, **fields: Any) -> str:
        """One SSE event of type `kind`, numbered."""
        payload = {"type": kind, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return f"event: {kind}\n" + sse_data(json.dumps(payload, ensure_ascii=False))

    def lifecycle(self, kind: str, response: ResponseObject) -> str:
        """response.created / in_progress / completed / incomplete, carrying the response object."""
        return self.event(kind, response=response.model_dump())

    def error(self, exc: APIError) -> str:
        """OpenAI's `error` event (the stream ends after it)."""
        return self.event("error", code=str(exc.status), message=exc.message, param=exc.param)

    # ------------------------------------------------------------ deltas
    def add(self, text: str, tool_calls: list[DeltaToolCall],
            logprobs: list[dict[str, Any]] | None = None) -> list[str]:
        """The events for the next piece of output: content text (with the `logprobs` of its
        tokens, when included), then tool-call deltas."""
        self._logprobs.extend(logprobs or [])
        events = self._text(text) if text else []
        for delta in tool_calls:
            events.extend(self._call(delta))
        return events

    def finish(self, incomplete: bool) -> list[str]:
        """Close the open item (an empty message when the output had no item at all)."""
        events: list[str] = []
        if not self.items:
            events.extend(self._open_message())
            events.extend(self._append_text(self._pending))
        events.extend(self._close(incomplete))
        return events

    def _text(self, text: str) -> list[str]:
        if not isinstance(self._open, OutputMessage):
            self._pending += text
            if not self._pending.strip():
                return []
            text, self._pending = self._pending, ""
            return self._close(False) + self._open_message() + self._append_text(text)
        return self._append_text(text)

    def _call(self, delta: DeltaToolCall) -> list[str]:
        arguments = delta.function.arguments if delta.function else None
        if delta.id is not None:                 # a new call: its first delta has the id and the name
            events = self._close(False)
            item = FunctionCallItem(id=response_item_id("fc"), call_id=delta.id, name=delta.function.name,
                                    arguments="", status="in_progress")
            self._calls[delta.index] = item
            events.append(self._added(item))
        else:
            events, item = [], self._calls[delta.index]
        if arguments:
            item.arguments += arguments
            events.append(self.event("response.function_call_arguments.delta", item_id=item.id,
                                     output_index=self._index(item), delta=arguments))
        return events

    # ------------------------------------------------------------- items
    def _open_message(self) -> list[str]:
        item = OutputMessage(id=response_item_id("msg"), status="in_progress")
        events = [self._added(item)]
        item.content.append(OutputText(text=""))
        events.append(self.event("response.content_part.added", item_id=item.id, output_index=self._index(item),
                                 content_index=0, part=OutputText(text="").model_dump()))
        return events

    def _append_text(self, text: str) -> list[str]:
        item = self._open
        if not text or not isinstance(item, OutputMessage):
            return []
        part, sent, self._logprobs = item.content[0], self._logprobs, []
        part.text += text
        part.logprobs.extend(sent)
        return [self.event("response.output_text.delta", item_id=item.id, output_index=self._index(item),
                           content_index=0, delta=text, logprobs=[_delta_logprob(entry) for entry in sent])]

    def _added(self, item: OutputMessage | FunctionCallItem) -> str:
        self.items.append(item)
        self._open = item
        return self.event("response.output_item.added", output_index=self._index(item), item=item.model_dump())

    def _close(self, incomplete: bool) -> list[str]:
        item, self._open = self._open, None
        if item is None:
            return []
        index = self._index(item)
        if isinstance(item, OutputMessage):
            item.status = "incomplete" if incomplete else "completed"
            part = item.content[0]
            part.logprobs.extend(self._logprobs)
            self._logprobs = []
            events = [self.event("response.output_text.done", item_id=item.id, output_index=index, content_index=0,
                                 text=part.text, logprobs=[_delta_logprob(entry) for entry in part.logprobs]),
                      self.event("response.content_part.done", item_id=item.id, output_index=index,
                                 content_index=0, part=part.model_dump())]
        else:
            item.status = "completed"
            events = [self.event("response.function_call_arguments.done", item_id=item.id, output_index=index,
                                 arguments=item.arguments)]
        events.append(self.event("response.output_item.done", output_index=index, item=item.model_dump()))
        return events

    def _index(self, item: OutputMessage | FunctionCallItem) -> int:
        return next(i for i, known in enumerate(self.items) if known is item)


def _delta_logprob(entry: dict[str, Any]) -> dict[str, Any]:
    """A token's logprob as the text delta / done events carry it (the output item's shape without bytes)."""
    return {"token": entry["token"], "logprob": entry["logprob"],
            "top_logprobs": [{"token": top["token"], "logprob": top["logprob"]} for top in entry["top_logprobs"]]}
