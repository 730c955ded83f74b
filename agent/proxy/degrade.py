"""Applying the cluster's degradation level to one request (the three levels of docs/sources.md, Clawdbot).

The coordinator's leader sets the level from the cluster's error rate; every agent's proxy
applies it to the requests that enter the cluster through it:

    level 1  an identical request (same path, model, messages, parameters, caller) answered in
             the last ``cache_ttl_s`` is answered again from the response cache
    level 2  as 1, and a model with a registered fallback is served by the fallback, the
             response saying so in ``X-Model-Downgraded: <fallback>``
    level 3  the static JSON {"status":"degraded","message":"High load, using fallback response"}

Every answer given this way carries ``X-Gpufleet-Degraded: cache|fallback|static``. A request
forwarded from another node is never degraded again (the entry node decided). A share of the
requests (``probe_share``) bypasses degradation: without traffic reaching the model servers the
error rate could never be measured again and level 3 would never end. A level record that
the leader stopped refreshing (coordinator gone, or this agent cut off from etcd) is ignored
``STALE_AFTER_S`` after this agent last saw it change, on the agent's monotonic clock (the
record's ``updated_at`` is the leader's wall clock, and hosts' clocks disagree): degradation
fails open, to normal serving, not to static answers forever.
"""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec
import structlog
from multidict import CIMultiDict

from agent.config import DegradationSection
from gpufleet.facts import DEGRADED_HEADER, REQUEST_ID_HEADER
from gpufleet.facts import DOWNGRADED_HEADER as DOWNGRADED_HEADER  # re-exported for the proxy
from gpufleet.facts import FALLBACK_REQUEST_HEADER as FALLBACK_REQUEST_HEADER
from gpufleet.routeslices import has_ready

from .cache import CachedResponse, ResponseCache, StreamRecorder, cache_key, json_object
from .exchange import Answer, Request, Sink
from .stats import ProxyStats

if TYPE_CHECKING:
    from .upstreams import Upstreams

log = structlog.get_logger("agent.degradation")

STATIC_BODY = msgspec.json.encode({"status": "degraded", "message": "High load, using fallback response"})
# The leader refreshes a non-zero level at least every 30 s; three missed refreshes = gone.
STALE_AFTER_S = 90.0


@dataclass
class Applied:
    """What degradation does to one request."""

    level: int
    cache_key: bytes | None = None  # where to store the answer (level >= 1)
    fallback: str | None = None  # the model that serves instead (level 2)
    body: bytes | None = None  # the request body rewritten for the fallback


NOT_DEGRADED = Applied(0)  # the answer for most requests: one object, never changed


class Degrader:
    def __init__(self, upstreams: Upstreams, stats: ProxyStats | None = None) -> None:
        self.upstreams = upstreams
        self.stats = stats if stats is not None else ProxyStats()
        self._cache: ResponseCache | None = None
        self._cache_cfg: DegradationSection | None = None
        self._rng = random.Random()

    @property
    def cfg(self) -> DegradationSection:
        return self.upstreams.degradation_cfg

    @property
    def cache(self) -> ResponseCache:
        c = self.cfg
        if self._cache is None or self._cache_cfg != c:  # (re)built when a reload changes the bounds
            self._cache = ResponseCache(c.cache_ttl_s, c.cache_max_entries, c.cache_max_bytes, c.cache_max_entry_bytes)
            self._cache_cfg = c
        return self._cache

    def level(self) -> int:
        routes = self.upstreams.routes
        if routes is None or not self.cfg.enabled or routes.degradation is None:
            return 0
        rec = routes.degradation
        if rec.level and time.monotonic() - routes.degradation_seen_at > STALE_AFTER_S:
            return 0
        return rec.level

    def plan(self, request: Request, body: bytes, model: str, forwarded: bool) -> Applied:
        level = 0 if forwarded else self.level()
        if level == 0 or self._rng.random() < self.cfg.probe_share:
            return NOT_DEGRADED
        if level >= 3:
            return Applied(3)
        # The caller is part of the key: two tenants asking the same question do not share answers.
        caller = hashlib.sha256((request.header("Authorization") or "").encode()).hexdigest()[:16]
        applied = Applied(level, cache_key(f"{request.path}\0{caller}", body) if len(body) <= 1 << 20 else None)
        if level >= 2 and (fallback := self._fallback(model)) is not None:
            rewritten = _with_model(body, fallback)
            if rewritten is not None:
                applied.fallback, applied.body = fallback, rewritten
        return applied

    def _fallback(self, model: str) -> str | None:
        """The registered fallback of ``model``, if something can serve it."""
        fallback = self.upstreams.fallback_of(model)
        if fallback is None:
            return None
        routes = self.upstreams.routes
        header = routes.headers.get(fallback) if routes is not None else None
        if self.upstreams.local(fallback) or (header is not None and has_ready(header)):
            return fallback  # its route is followed before the request goes there
        return None

    # --- answers ---------------------------------------------------------------------------

    def static_response(self, rid: str) -> Answer:
        headers = CIMultiDict({"Content-Type": "application/json", DEGRADED_HEADER: "static", REQUEST_ID_HEADER: rid})
        return Answer(self.cfg.static_status, headers, STATIC_BODY)

    def cached(self, key: bytes | None) -> CachedResponse | None:
        if key is None:
            return None
        hit = self.cache.get(key)
        if hit is None:
            self.stats.cache_misses += 1
        else:
            self.stats.cache_hits += 1
        return hit

    async def replay(self, sink: Sink, hit: CachedResponse, rid: str) -> Answer:
        """The cached answer: returned whole, or a stream replayed chunk by chunk through ``sink``."""
        headers = CIMultiDict(hit.headers)
        headers[DEGRADED_HEADER] = "cache"
        headers[REQUEST_ID_HEADER] = rid
        if hit.body is not None:
            return Answer(hit.status, headers, hit.body)
        await sink.start(hit.status, headers)
        for chunk in hit.chunks or ():
            await sink.write(chunk)
        await sink.end()
        return Answer(hit.status, headers, sent=True)

    def store(self, key: bytes, status: int, headers: CIMultiDict[str], body: bytes) -> None:
        self.cache.put(key, CachedResponse(status, _replayable(headers), body, None))

    def recorder(self) -> StreamRecorder:
        return StreamRecorder(self.cfg.cache_max_entry_bytes)

    def store_stream(self, key: bytes, status: int, headers: CIMultiDict[str], rec: StreamRecorder) -> None:
        entry = rec.response(status, _replayable(headers))
        if entry is not None:
            self.cache.put(key, entry)


def _replayable(headers: CIMultiDict[str]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers.items() if k.lower() != REQUEST_ID_HEADER.lower()]


def _with_model(body: bytes, model: str) -> bytes | None:
    obj = json_object(body)
    if obj is None:
        return None
    obj["model"] = model
    return msgspec.json.encode(obj)
