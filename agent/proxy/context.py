"""What the proxy knows about one request: its parsed head, where it may go, what happened.

Kept apart from the forwarding code in server.py so each reads top-down.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec
from aiohttp import web

from gpufleet.facts import HOP_BY_HOP_HEADERS, REQUEST_ID_HEADER
from gpufleet.httperrors import error_response
from gpufleet.keyspace.records import RouteRecord

from .exchange import Answer, answer_of
from .multipart import FormError, form_fields

if TYPE_CHECKING:
    from agent.config import ProxySection
    from agent.keys.usage import Usage
    from gpufleet.keyspace.records import ApiKeyRecord

    from .limits import ModelGate
    from .upstreams import LocalUpstream

# The routes forwarded by model, byte for byte. Each body is a JSON object with ``model`` (and
# ``stream``), except the audio uploads: a multipart form with those as fields (multipart.py).
# Whether an instance serves a route is its server's business: one that does not answers 404
# (vLLM has no images or speech; llama.cpp no audio), passed to the client as the request's
# error, never counted against the instance (Backend.judge: a 4xx is the request's).
JSON_ROUTES = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",  # OpenAI's Responses API
    "/v1/rerank",  # Jina/Cohere rerank, as vLLM and llama.cpp serve it
    "/rerank",
    "/v2/rerank",
    "/v1/score",  # vLLM's pairwise score
    "/score",
    "/v1/audio/speech",
    "/v1/images/generations",
    "/v1/messages",  # Anthropic's Messages API (vLLM, llama.cpp)
    "/v1/messages/count_tokens",
)
FORM_ROUTES = ("/v1/audio/transcriptions", "/v1/audio/translations")
ROUTES = JSON_ROUTES + FORM_ROUTES
# Refusals on these routes are in Anthropic's error shape (surface.py): its clients read no other.
ANTHROPIC_ROUTES = frozenset({"/v1/messages", "/v1/messages/count_tokens"})
_FORM_FIELDS = frozenset({"model", "stream"})
_TRUE = frozenset({"true", "1", "yes", "on"})  # form booleans as vLLM's (pydantic's) parser reads them
HOP_BY_HOP = HOP_BY_HOP_HEADERS  # RFC 9110 §7.6.1, plus those aiohttp sets itself
# A request body arrives decoded (aiohttp decodes the Content-Encodings gpufleet/httperrors.py
# allows, and refuses the others with 415): labelled as still encoded, the upstream would fail on it.
# Expect: the body goes out with the head, so an upstream's 100 Continue would only be in the way.
REQUEST_HOP_BY_HOP = HOP_BY_HOP | {"content-encoding", "expect"}
UNKNOWN_MODEL_LABEL = "_unknown"  # keeps a client's random model names out of metric labels


# X-Request-ID when the client sent none: 32 hex digits, as a uuid4's, but this process's
# random 64 bits and a counter: unique across the fleet without a random draw per request.
_RID_PREFIX = os.urandom(8).hex()
_rid_counter = itertools.count(int.from_bytes(os.urandom(4)))


def new_request_id() -> str:
    return f"{_RID_PREFIX}{next(_rid_counter) & 0xFFFF_FFFF_FFFF_FFFF:016x}"


class Head(msgspec.Struct):
    model: str
    stream: bool = False


class Failure(Exception):
    """An attempt failed before the first byte; ``response`` is what the client gets if no
    retry is left."""

    def __init__(self, kind: str, response: web.Response | Answer | None, detail: str, *, counted: bool = True) -> None:
        super().__init__(detail)
        self.kind, self.detail = kind, detail
        self.response = answer_of(response) if response is not None else None
        self.counted = counted  # toward the cluster error rate and the instance's errors


def bad_request(message: str, code: str = "invalid_request") -> web.Response:
    return error_response(400, message, "invalid_request_error", code)


def retry_later(status: int, message: str, type_: str, code: str, rid: str, retry_after_s: int) -> web.Response:
    """A refusal the client should retry (a queue full, a model starting): ``Retry-After`` and
    the request's id."""
    return error_response(status, message, type_, code, {"Retry-After": str(retry_after_s), REQUEST_ID_HEADER: rid})


def parse_head(body: bytes, path: str = "", content_type: str = "") -> Head | web.Response:
    """``model`` and ``stream`` of a request body, or the 400 that refuses it: from the form
    fields on the multipart routes (``FORM_ROUTES``), from the JSON object on the others."""
    if path in FORM_ROUTES:
        return form_head(body, content_type)
    return json_head(body)


def form_head(body: bytes, content_type: str) -> Head | web.Response:
    """``model`` and ``stream`` of a multipart form, read in place (no copy of its file part)."""
    try:
        fields = form_fields(body, content_type, _FORM_FIELDS)
    except FormError as e:
        return bad_request(f"invalid multipart/form-data body: {e}", "invalid_multipart")
    model = fields.get("model", "").strip()
    if not model:
        return bad_request("you must provide a model parameter", "missing_model")
    return Head(model, fields.get("stream", "").strip().lower() in _TRUE)


def json_head(body: bytes) -> Head | web.Response:
    """``model`` and ``stream`` of a JSON request body, or the 400 that refuses it.

    The gate for every JSON body the proxy forwards: what passes here is valid JSON in UTF-8 (msgspec
    skips the fields it does not decode without checking their UTF-8, so that is checked here;
    the degradation cache and task routing decode the whole body later) and nested no deeper
    than msgspec decodes (it raises RecursionError past that)."""
    if not body.isascii():
        try:
            body.decode()
        except UnicodeDecodeError as e:
            return bad_request(f"the request body is not valid UTF-8 (byte {e.start})", "invalid_json")
    try:
        head = msgspec.json.decode(body, type=Head)
    except RecursionError:
        return bad_request("the request body is nested too deeply", "invalid_json")
    except msgspec.ValidationError as e:
        text = str(e)
        if "missing required field `model`" in text:
            return bad_request("you must provide a model parameter", "missing_model")
        if "Expected `object`" in text and "- at" not in text:
            return bad_request("the request body must be a JSON object")
        return bad_request(f"invalid request: {text}")
    except msgspec.DecodeError as e:
        return bad_request(f"the request body is not valid JSON: {e}", "invalid_json")
    if not head.model:
        return bad_request("you must provide a model parameter", "missing_model")
    return head


@dataclass
class Plan:
    """Where one request may go: local instances, and the route table when forwarding is allowed."""

    model: str  # the model served: the one asked for, or its fallback (degradation level 2)
    serving: list[LocalUpstream]
    route: RouteRecord | None
    group: list[str] | None = None
    # Local instances set aside (saturated or drained) in favour of other nodes: they serve
    # after all if no other node can, so a request is never refused while a local one is READY.
    deferred: list[LocalUpstream] = field(default_factory=list)
    gate: ModelGate | None = None  # the local concurrency gate, once acquired
    session: str | None = None  # the client's session ([proxy] affinity_header): sticks to one target


class Ctx:
    """What the access log and metrics need to know about one request."""

    __slots__ = (
        "auth_headers",
        "billed",
        "cache_key",
        "cfg",
        "counted",
        "degraded",
        "demand",
        "downgraded",
        "held",
        "hide_usage",
        "instance",
        "key",
        "key_name",
        "loop_started",
        "model",
        "model_label",
        "retries",
        "rid",
        "started",
        "status",
        "stream",
        "stream_error",
        "ttfb",
        "usage",
    )

    def __init__(self, rid: str, started: float, cfg: ProxySection, loop_now: float | None = None) -> None:
        self.rid = rid
        self.started = started
        self.cfg = cfg  # [proxy] as the request began: one request sees one config, read once
        self.model: str | None = None
        self.model_label = UNKNOWN_MODEL_LABEL
        self.instance: str | None = None
        self.status = 0
        self.stream = False
        self.stream_error = False
        self.retries = 0
        self.ttfb: float | None = None
        self.demand: str | None = None  # an on-demand model this request keeps wanted (coldstart.py)
        self.held = 0.0  # seconds held by a cold start (coldstart.py): not in the retry budget
        # Degradation: where to store the answer, the fallback serving instead, how it was degraded.
        self.cache_key: bytes | None = None
        self.downgraded: str | None = None
        self.degraded: str | None = None
        # Attempts count toward the cluster error rate, except those made for a fallback: the
        # rate must keep measuring the primary models, or degrading would hide the failure that
        # caused it and the level would flap.
        self.counted = True
        # API keys (agent/keys/gate.py): the key this node accepted (None: open mode, or a signed
        # forward, whose key name the entry node passed on), the x-ratelimit-* headers of the
        # answer, whether to hide the usage event asked for on the client's behalf, and the usage.
        self.key: ApiKeyRecord | None = None
        self.key_name: str | None = None
        self.auth_headers: dict[str, str] | None = None
        self.hide_usage = False
        self.usage: Usage | None = None
        self.billed = False  # counted and journalled (KeyGate.bill), which happens once
        # The event loop's time as it began (``loop_now``: the caller's cached reading; looking
        # the loop up costs a getpid(2) per request).
        self.loop_started = asyncio.get_running_loop().time() if loop_now is None else loop_now

    def done(self, resp: web.Response | Answer) -> Answer:
        """The request's answer, as the pipeline returns it; its status for the access log."""
        answer = answer_of(resp)
        self.status = answer.status
        return answer
