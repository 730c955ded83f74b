"""Response cache for degradation level 1: identical requests get the answer already given.

At level 1 the cluster's error rate is 5-15 %: the model servers still answer, but every request
they are spared helps. A request identical to a recent one (same path, model, messages and
parameters) is answered from here instead of going upstream.

- TTL 60 s, the production gateway's choice (docs/sources.md, Clawdbot): the cache exists to
  shed load for the minutes of an incident, not to serve answers that the model would no longer
  give; a short TTL bounds how stale an answer can be.
- Bounded in entries, in total bytes and per entry: it lives in the agent's memory next to the
  proxy, and a burst of large distinct answers must not grow the agent until the OOM killer picks it.
- A streamed (SSE) answer is recorded chunk by chunk and replayed as the same chunks: the client
  asked for a stream and gets a stream, byte-identical to the original one. ``stream`` is part of
  the key, so a streaming request never gets a non-streaming answer or the reverse.

Only complete 200 answers are stored (an error is not an answer to replay). Expired entries are
dropped when looked up, or evicted as least recently used. Pure Python, no asyncio, no lock: the
agent's event loop is the only caller.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec


@dataclass
class CachedResponse:
    status: int
    headers: list[tuple[str, str]]  # response headers to replay (the caller filters hop-by-hop ones)
    body: bytes | None  # non-streaming answer
    chunks: list[bytes] | None  # SSE stream, replayed chunk by chunk
    stored_at: float = 0.0  # set by ResponseCache.put, on the cache's clock
    size: int = 0  # bytes counted against the budget (body/chunks + headers); 0: measured here

    def __post_init__(self) -> None:
        if (self.body is None) == (self.chunks is None):
            raise ValueError("exactly one of body and chunks must be set")
        if not self.size:
            self.size = (
                len(self.body or b"")
                + sum(len(c) for c in self.chunks or ())
                + sum(len(k) + len(v) for k, v in self.headers)
            )


def json_object(body: bytes) -> dict[str, Any] | None:
    """The request body as a JSON object; None when it is not valid JSON or not an object."""
    try:
        obj = msgspec.json.decode(body)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):  # too deep; not UTF-8
        return None
    return obj if isinstance(obj, dict) else None


def cache_key(path: str, body: bytes) -> bytes | None:
    """sha256 of the path and the canonical request body; None when the body is not a JSON object.

    Canonical: decoded and re-encoded with keys sorted recursively and no whitespace, so key order
    and spacing do not make two identical requests different. Values are kept as they are (``1``
    and ``1.0`` differ): a miss costs an upstream call, a wrong hit a wrong answer.
    """
    obj = json_object(body)
    if obj is None:
        return None
    canonical = msgspec.json.encode(obj, order="sorted")
    return hashlib.sha256(path.encode() + b"\0" + canonical).digest()


class StreamRecorder:
    """Records the chunks of an SSE stream being forwarded, up to ``max_entry_bytes``.

    Past the limit it sets ``overflow``, drops what it held and ignores further chunks: the stream
    is still forwarded, it is just not cached.
    """

    def __init__(self, max_entry_bytes: int) -> None:
        self.max_entry_bytes = max_entry_bytes
        self.chunks: list[bytes] = []
        self.size = 0
        self.overflow = False

    def add(self, chunk: bytes) -> None:
        if self.overflow:
            return
        if self.size + len(chunk) > self.max_entry_bytes:
            self.overflow = True
            self.chunks = []
            self.size = 0
            return
        self.chunks.append(bytes(chunk))
        self.size += len(chunk)

    def response(self, status: int, headers: list[tuple[str, str]]) -> CachedResponse | None:
        """The recorded stream as a cache entry (call once it completed); None after an overflow."""
        if self.overflow:
            return None
        return CachedResponse(status=status, headers=headers, body=None, chunks=list(self.chunks))


class ResponseCache:
    """LRU cache of complete 200 answers, with a TTL and bounds on entries and bytes."""

    def __init__(
        self,
        ttl_s: float = 60.0,
        max_entries: int = 1024,
        max_bytes: int = 64 * 2**20,
        max_entry_bytes: int = 2**20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0: {ttl_s!r}")
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1: {max_entries!r}")
        if not 1 <= max_entry_bytes <= max_bytes:
            raise ValueError(f"max_entry_bytes must be in [1, max_bytes]: {max_entry_bytes!r}")
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_entry_bytes
        self._clock = clock
        self._entries: OrderedDict[bytes, CachedResponse] = OrderedDict()  # least recently used first
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: bytes) -> CachedResponse | None:
        """The live entry for ``key`` (and marks it recently used); None on a miss or an expired entry."""
        resp = self._entries.get(key)
        if resp is not None and self._clock() - resp.stored_at >= self.ttl_s:
            self._remove(key)
            resp = None
        if resp is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return resp

    def put(self, key: bytes, resp: CachedResponse) -> bool:
        """Stores ``resp`` (stamping ``stored_at``), replacing any entry for ``key``; False if refused.

        Refused: a status other than 200, or larger than ``max_entry_bytes``. Least recently used
        entries are evicted until the cache is within ``max_entries`` and ``max_bytes``.
        """
        if resp.status != 200 or resp.size > self.max_entry_bytes:
            return False
        if key in self._entries:
            self._remove(key)
        resp.stored_at = self._clock()
        self._entries[key] = resp
        self._bytes += resp.size
        # The new entry is last and fits max_bytes alone, so it is never the one evicted.
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            self._remove(next(iter(self._entries)))
            self.evictions += 1
        return True

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def _remove(self, key: bytes) -> None:
        self._bytes -= self._entries.pop(key).size

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def entries(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:  # last in the class: the name shadows the builtin in the class body
        """Current total size of the entries, in bytes."""
        return self._bytes
