"""Token usage from the model server's own answer, for per-key accounting and ``tpm``.

Non-streaming answers carry ``usage`` in the body. A stream carries it only when asked: OpenAI's
``stream_options.include_usage`` adds one last event with ``"choices": []`` and the totals
(vLLM and llama.cpp do the same; llama.cpp also puts ``usage`` in its last regular event).
When the client did not ask, the proxy asks on its behalf (``ask_for_usage``) and removes that
one extra event from what the client receives (``StreamUsage``): the client sees the bytes it
would have seen, the agent learns the totals. Anthropic's ``/v1/messages`` reports
``input_tokens`` in ``message_start`` and a running ``output_tokens`` in ``message_delta``; the
Responses API's stream reports them in its last event, ``response.completed``.

Only events that mention ``usage`` are decoded; the rest pass through as the bytes they came in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

_encoder = msgspec.json.Encoder()


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def merge(self, other: Usage) -> None:
        """Totals only grow: OpenAI's final event has them all, Anthropic's arrive in parts."""
        self.prompt_tokens = max(self.prompt_tokens, other.prompt_tokens)
        self.completion_tokens = max(self.completion_tokens, other.completion_tokens)


def _int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0


def usage_in(doc: Any) -> Usage | None:
    """The usage a decoded answer or event reports, in OpenAI's or Anthropic's words."""
    if not isinstance(doc, dict):
        return None
    u = doc.get("usage")
    if not isinstance(u, dict):
        # Anthropic's message_start has it in "message", the Responses API's
        # response.completed in "response".
        outer = next((o for o in (doc.get("message"), doc.get("response")) if isinstance(o, dict)), None)
        u = outer.get("usage") if outer is not None else None
        if not isinstance(u, dict):
            return None
    return Usage(
        prompt_tokens=_int(u.get("prompt_tokens", u.get("input_tokens"))),
        completion_tokens=_int(u.get("completion_tokens", u.get("output_tokens"))),
    )


class _Carrier(msgspec.Struct):
    """The only fields usage can be in: decoding just these skips the rest of an answer (the
    generated text, logprobs) without building it."""

    usage: Any = None
    message: Any = None
    response: Any = None
    choices: Any = msgspec.UNSET  # only whether it is [] matters (the usage-only stream event)


_carrier = msgspec.json.Decoder(_Carrier)


def _carried(data: bytes) -> _Carrier | None:
    try:
        return _carrier.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def _usage_of(c: _Carrier) -> Usage | None:
    return usage_in({"usage": c.usage, "message": c.message, "response": c.response})


def usage_of_body(body: bytes) -> Usage | None:
    if b'"usage"' not in body:
        return None
    c = _carried(body)
    return _usage_of(c) if c is not None else None


def ask_for_usage(request: dict[str, Any]) -> bool:
    """Make a streaming OpenAI request ask for the usage event; True when the client had not
    (so the proxy must hide the extra event). Changes ``request`` in place."""
    if request.get("stream") is not True:
        return False
    options = request.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return False
    if options is not None and not isinstance(options, dict):
        return False  # the client sent something odd: pass it on untouched, let the server judge
    request["stream_options"] = {**(options or {}), "include_usage": True}
    return True


class StreamUsage:
    """Watches a server-sent-event stream for usage; with ``hide_usage_event`` also removes the
    usage-only event (``"choices": []``) the proxy asked for on the client's behalf.

    ``feed`` returns the bytes to send on. Without hiding that is always the chunk itself, at
    once. With hiding, whole events go on at once and a trailing partial event waits for its end
    (servers write an event at a time, so in practice nothing waits)."""

    __slots__ = ("_hide", "_on_end", "_pending", "usage")

    def __init__(self, hide_usage_event: bool, on_end: Callable[[Usage | None], None] | None = None) -> None:
        self._hide = hide_usage_event
        self._pending = b""  # an incomplete event
        self.usage: Usage | None = None
        # Called once, with the usage, when the event that ends the stream is in hand and before
        # it goes on: the request is billed before the client has its end (clients such as the
        # openai SDK hang up at [DONE], without waiting for the end of the HTTP body).
        self._on_end = on_end

    def feed(self, chunk: bytes) -> bytes:
        data = self._pending + chunk if self._pending else chunk
        end = data.rfind(b"\n\n")
        if end < 0:
            self._pending = data
            return chunk if not self._hide else b""
        complete, self._pending = data[: end + 2], data[end + 2 :]
        if b'"usage"' in complete:
            complete = self._scan(complete)
        if self._on_end is not None and ends_stream(complete):
            on_end, self._on_end = self._on_end, None
            on_end(self.usage)
        if not self._hide:
            return chunk
        return complete

    def finish(self) -> bytes:
        """The stream ended: what is left (an event without its blank line) goes on as it is."""
        rest, self._pending = self._pending, b""
        if rest and b'"usage"' in rest:
            self._scan(rest + b"\n\n")
        return rest if self._hide else b""

    def _scan(self, events: bytes) -> bytes:
        kept = []
        for event in events.split(b"\n\n"):
            if b'"usage"' in event and self._read(event):
                continue  # the event the proxy asked for: the client did not
            kept.append(event)
        return b"\n\n".join(kept)

    def _read(self, event: bytes) -> bool:
        """Record the usage in ``event``; True when the event exists only to carry it and the
        client did not ask for it."""
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            c = _carried(line[5:].strip())
            found = _usage_of(c) if c is not None else None
            if c is None or found is None:
                return False
            if self.usage is None:
                self.usage = Usage()
            self.usage.merge(found)
            return self._hide and c.choices == []
        return False


# The events that end a stream, at the start of a line (a model's text cannot put a raw newline
# there: JSON escapes it): OpenAI's [DONE], Anthropic's message_stop, the Responses API's last.
_END_MARKERS = (b"data: [DONE]", b"data:[DONE]", b"event: message_stop", b"event: response.completed")


def ends_stream(events: bytes) -> bool:
    """Whether whole SSE ``events`` hold the event that ends the stream."""
    return any(events.startswith(m) or b"\n" + m in events for m in _END_MARKERS)


def encode_request(request: dict[str, Any]) -> bytes:
    return _encoder.encode(request)
