"""One watch stream over the gateway's streaming ``/v3/watch``, with a guard against silent hangs.

The gateway turns the bidirectional gRPC stream into one long HTTP POST: we send a single
``{"create_request": {...}}`` and read newline-delimited ``{"result": WatchResponse}`` objects.
We cannot send anything more on it (Go's HTTP/1 server stops reading a request body once the
response has started), so no cancel requests and no progress requests: a watch ends by closing
the connection.

Silent hangs. A watch on a quiet prefix legitimately receives nothing, and a watch whose member
hung (SIGSTOP, a stuck disk, a host gone without a RST) receives nothing too. etcd's progress
notifications would tell the two apart, but they come every 10 minutes by default
(``--experimental-watch-progress-notify-interval``). So after ``idle_timeout`` seconds of
silence the watch asks the *same member* for its status (a cheap unary call, sent with
``hasleader`` so a member that lost its leader fails it too). If that fails, the watch raises
EtcdUnavailable and the caller reconnects, possibly elsewhere. If it answers, the connection
itself may still be dead (a load balancer or NAT table that forgot it, while the member is
fine), so when the member's revision has moved past ``next_revision`` the watch asks again, with
a short-lived probe watch from ``next_revision`` on the same keys: events there are events this
stream should have delivered, so it raises EtcdUnavailable and the caller resumes from
``next_revision`` (nothing lost; at worst a needless reconnect when an event was in flight).
Otherwise silence was just quiet and the wait goes on.

History that went backwards. Restoring etcd from a snapshot, or wiping it, rewinds the store's
revision. etcd accepts a watch that resumes at our (now future) ``next_revision`` and then says
nothing until its new counter gets there: every watch goes blind, silently. So whenever a
member reports a revision below ``next_revision - 1`` (the "created" answer of a new watch, or
the status call above), the watch asks the cluster for its current revision with a
linearizable read: a follower merely lagging behind shows a higher revision there, and the
watch carries on; a cluster whose history was rewound shows a lower one, and the watch raises
EtcdHistoryLost (an EtcdCompacted: the caller lists again, as after a compaction).

Resuming. ``next_revision`` is where a new watch must start so that nothing is missed or seen
twice: the last event's ``mod_revision + 1``, or a progress notification's header revision + 1.
It is *not* any header revision: a watch catching up on history receives batches whose header
carries the current store revision while older events are still to come.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import structlog

from .errors import (
    EtcdCompacted,
    EtcdError,
    EtcdHistoryLost,
    EtcdNoLeader,
    EtcdUnavailable,
    classify,
    error_from_body,
)
from .messages import Key, WatchResponse, range_fields

if TYPE_CHECKING:
    from .client import EtcdClient
    from .stream import Stream

log = structlog.get_logger("gpufleet.etcd")

# How long a probe watch waits for history it should find. etcd replays an unsynced watcher's
# history in its sync loop, every 100 ms; this leaves room for a loaded member.
PROBE_WAIT_S = 2.0


class Watch:
    """An async iterator of WatchResponse; also an async context manager that closes the stream.

    Raises EtcdCompacted when ``start_revision`` is older than the last compaction, EtcdNoLeader
    or EtcdUnavailable when the member goes away, EtcdAuthError when the key is not readable.
    """

    def __init__(
        self,
        client: EtcdClient,
        key: Key,
        *,
        prefix: bool = True,
        range_end: Key | None = None,
        start_revision: int | None = None,
        progress_notify: bool = True,
        prev_kv: bool = False,
        idle_timeout: float = 15.0,
        timeout: float | None = None,
    ) -> None:
        self._client = client
        self._key, self._prefix, self._range_end = key, prefix, range_end
        self._create: dict[str, Any] = {**range_fields(key, prefix=prefix, range_end=range_end)}
        if start_revision:
            self._create["start_revision"] = str(start_revision)
        if progress_notify:
            self._create["progress_notify"] = True
        if prev_kv:
            self._create["prev_kv"] = True
        self.idle_timeout = idle_timeout
        self._timeout = timeout
        self._stream: Stream | None = None
        self._closed = False
        # The revision at which the watch was created (header of the "created" response).
        self.created_revision = 0
        # Where a new watch must start to continue this one exactly (0 until known).
        self.next_revision = start_revision or 0

    @property
    def endpoint(self) -> str | None:
        return self._stream.endpoint if self._stream else None

    async def open(self) -> Watch:
        """Create the watch on some member (with failover) and wait for etcd to confirm it."""
        if self._stream is None:
            stream = await self._client.transport.open_stream(
                "/v3/watch", {"create_request": self._create}, timeout=self._timeout
            )
            self._stream = stream
            try:
                created = WatchResponse.parse(stream.first.get("result") or {})
                self._check_canceled(created)
                self.created_revision = created.revision
                if not self.next_revision:
                    self.next_revision = created.revision + 1
                elif created.revision + 1 < self.next_revision:
                    await self._check_history()
            except BaseException:
                self.close()
                raise
        return self

    def close(self) -> None:
        self._closed = True
        if self._stream is not None:
            self._stream.close()

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> Watch:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> WatchResponse:
        if self._closed:
            raise StopAsyncIteration
        await self.open()
        assert self._stream is not None
        try:
            msg = await self._next_message(self._stream)
            if msg is None:
                raise EtcdUnavailable(f"etcd watch stream from {self._stream.endpoint} ended", endpoint=self.endpoint)
            if "error" in msg:
                raise error_from_body(msg, endpoint=self._stream.endpoint)
            resp = WatchResponse.parse(msg.get("result") or {})
            self._check_canceled(resp)
        except BaseException:
            self.close()
            raise
        if resp.events:
            self.next_revision = resp.events[-1].kv.mod_revision + 1
        elif resp.progress and resp.revision >= self.next_revision:
            self.next_revision = resp.revision + 1
        return resp

    def _check_canceled(self, resp: WatchResponse) -> None:
        if not resp.canceled:
            return
        self.close()
        if resp.compact_revision:
            raise EtcdCompacted(
                f"etcd watch start revision {self._create.get('start_revision')} was compacted "
                f"(oldest available: {resp.compact_revision})",
                compact_revision=resp.compact_revision,
                endpoint=self.endpoint,
            )
        reason = resp.cancel_reason or "etcd canceled the watch"
        # Stream errors arrive as "rpc error: code = PermissionDenied desc = etcdserver: ...".
        err = classify(reason, endpoint=self.endpoint)
        if type(err) is EtcdError and "no leader" not in reason:
            err = EtcdUnavailable(f"etcd canceled the watch: {reason}", endpoint=self.endpoint)
        raise err

    async def _next_message(self, stream: Stream) -> dict[str, Any] | None:
        """The next message; on ``idle_timeout`` of silence, check the member is alive (see top)."""
        while True:
            try:
                async with asyncio.timeout(self.idle_timeout):
                    return await stream.next_json()
            except TimeoutError:
                pass
            check = min(self._client.timeout, max(self.idle_timeout, 1.0))
            try:
                status = await self._client.status(endpoint=stream.endpoint, timeout=check)
                if not status.leader:  # only seen with require_leader=False; hasleader fails the call
                    raise EtcdNoLeader("etcdserver: no leader", endpoint=stream.endpoint)
            except EtcdError as e:
                raise EtcdUnavailable(
                    f"etcd watch on {stream.endpoint} silent for {self.idle_timeout:.0f}s and the member "
                    f"does not answer: {e.message}",
                    endpoint=stream.endpoint,
                ) from e
            if status.revision + 1 < self.next_revision:
                await self._check_history()
            if status.revision >= self.next_revision and await self._missed_events():
                raise EtcdUnavailable(
                    f"etcd watch on {stream.endpoint} silent for {self.idle_timeout:.0f}s although there are "
                    f"events from revision {self.next_revision}: the stream is hung",
                    endpoint=stream.endpoint,
                )
            log.debug("etcd watch idle, member alive", endpoint=stream.endpoint)

    async def _check_history(self) -> None:
        """A member is behind ``next_revision``: lagging (fine) or rewound (EtcdHistoryLost)? See top."""
        # A linearizable read answers with the cluster's latest committed revision, which can
        # never be below a revision this watch has seen, unless etcd's history was replaced.
        latest = (await self._client.range(self._key, limit=1, count_only=True)).revision
        if latest + 1 < self.next_revision:
            raise EtcdHistoryLost(
                f"etcd's revision went backwards: the cluster is at revision {latest} but this watch "
                f"had seen up to {self.next_revision - 1} (restored from a backup, or wiped)",
                revision=latest,
                resume_revision=self.next_revision,
                endpoint=self.endpoint,
            )
        log.debug("etcd member behind the watch's resume point; it lags", latest=latest, resume=self.next_revision)

    async def _missed_events(self) -> bool:
        """Whether a fresh watch from ``next_revision`` on the same keys sees events at once."""
        start = self.next_revision
        for _ in range(2):  # a second try from the compaction point when ``start`` was compacted
            probe = Watch(
                self._client,
                self._key,
                prefix=self._prefix,
                range_end=self._range_end,
                start_revision=start,
                progress_notify=False,
            )
            try:
                async with await probe.open():
                    async with asyncio.timeout(PROBE_WAIT_S):
                        return bool((await anext(probe)).events)
            except EtcdCompacted as e:
                if not e.compact_revision:
                    return False
                start = e.compact_revision
            except (TimeoutError, EtcdError):
                return False  # nothing to catch up on (etcd sends history at once), or cannot tell
        return False
