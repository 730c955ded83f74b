"""Token usage from answers and streams (agent/keys/usage.py): what the client receives is what
it would have received, and the agent learns the totals."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.keys.usage import StreamUsage, Usage, ask_for_usage, usage_of_body


def sse(doc: object) -> bytes:
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


CHUNKS = [sse({"choices": [{"index": 0, "delta": {"content": w}}]}) for w in ("Hel", "lo", " you")]
USAGE_EVENT = sse({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}})
DONE = b"data: [DONE]\n\n"


def run(stream: StreamUsage, pieces: list[bytes]) -> bytes:
    return b"".join(stream.feed(p) for p in pieces) + stream.finish()


def test_non_streaming_bodies() -> None:
    assert usage_of_body(b'{"usage": {"prompt_tokens": 5, "completion_tokens": 2}}') == Usage(
        prompt_tokens=5, completion_tokens=2
    )
    assert usage_of_body(b'{"usage": {"prompt_tokens": 4, "total_tokens": 4}}') == Usage(prompt_tokens=4)  # embeddings
    assert usage_of_body(b'{"usage": {"input_tokens": 9, "output_tokens": 1}}') == Usage(
        prompt_tokens=9, completion_tokens=1
    )  # Anthropic
    assert usage_of_body(b'{"choices": []}') is None
    assert usage_of_body(b'{"usage": "nonsense"}') is None
    assert usage_of_body(b'not json but has "usage"') is None


@pytest.mark.parametrize(
    ("request_body", "asked", "after"),
    [
        ({"stream": True}, True, {"stream": True, "stream_options": {"include_usage": True}}),
        ({"stream": True, "stream_options": {"include_usage": True}}, False, None),
        ({"stream": True, "stream_options": {"continuous_usage_stats": False}}, True,
         {"stream": True, "stream_options": {"continuous_usage_stats": False, "include_usage": True}}),
        ({"stream": False}, False, None),
        ({}, False, None),
        ({"stream": True, "stream_options": "odd"}, False, None),
    ],
)  # fmt: skip
def test_asking_for_usage(request_body: dict[str, object], asked: bool, after: dict[str, object] | None) -> None:
    before = json.loads(json.dumps(request_body))
    assert ask_for_usage(request_body) is asked
    assert request_body == (after if after is not None else before)


def test_the_usage_event_the_proxy_asked_for_is_hidden() -> None:
    stream = StreamUsage(hide_usage_event=True)
    out = run(stream, [*CHUNKS, USAGE_EVENT, DONE])
    assert out == b"".join([*CHUNKS, DONE])
    assert stream.usage == Usage(prompt_tokens=7, completion_tokens=3)


def test_a_client_that_asked_gets_the_usage_event_untouched() -> None:
    stream = StreamUsage(hide_usage_event=False)
    pieces = [*CHUNKS, USAGE_EVENT, DONE]
    assert run(stream, pieces) == b"".join(pieces)
    assert stream.usage == Usage(prompt_tokens=7, completion_tokens=3)


def test_usage_inside_a_regular_event_is_read_and_kept() -> None:
    """llama.cpp puts usage into its last event with choices: nothing is removed."""
    last = sse({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 2,
               "completion_tokens": 1}})  # fmt: skip
    stream = StreamUsage(hide_usage_event=True)
    assert run(stream, [*CHUNKS, last, DONE]) == b"".join([*CHUNKS, last, DONE])
    assert stream.usage == Usage(prompt_tokens=2, completion_tokens=1)


def test_anthropic_usage_arrives_in_parts() -> None:
    events = [
        b"event: message_start\n" + sse({"type": "message_start", "message": {"usage": {"input_tokens": 12,
                                                                                         "output_tokens": 1}}}),
        b"event: message_delta\n" + sse({"type": "message_delta", "usage": {"output_tokens": 30}}),
    ]  # fmt: skip
    stream = StreamUsage(hide_usage_event=False)
    assert run(stream, events) == b"".join(events)
    assert stream.usage == Usage(prompt_tokens=12, completion_tokens=30)


@given(st.lists(st.integers(1, 40), min_size=1, max_size=30))
def test_any_split_of_the_stream_gives_the_same_bytes_and_usage(cuts: list[int]) -> None:
    whole = b"".join([*CHUNKS, USAGE_EVENT, DONE])
    pieces, at = [], 0
    for n in cuts:
        pieces.append(whole[at : at + n])
        at += n
    pieces.append(whole[at:])
    for hide in (True, False):
        stream = StreamUsage(hide_usage_event=hide)
        expected = b"".join([*CHUNKS, DONE]) if hide else whole
        assert run(stream, [p for p in pieces if p]) == expected
        assert stream.usage == Usage(prompt_tokens=7, completion_tokens=3)
