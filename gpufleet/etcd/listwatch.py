"""List-then-watch: a change stream a consumer can apply to a local map without ever missing a change.

``list_watch(client, prefix)`` yields (for the keys in [prefix, range_end) with ``range_end``):

1. ``Snapshot(kvs, revision)``: every key under the prefix, read consistently at one revision
   (paginated with ``revision=`` pinned, so a big prefix is not one huge response);
2. then ``Put``/``Delete`` for every change after that revision, in order, each exactly once.

When the watch breaks (member died, hung, lost its leader, stale token, ...) it reconnects,
possibly to another member, resuming at ``Watch.next_revision``: nothing missed, nothing
repeated. When etcd says that revision was compacted, the events in between are gone for good;
it lists again and yields a fresh ``Snapshot``, which the consumer applies by *replacing* its map.
The same happens when etcd's history went backwards (restored from a backup, or wiped: see
watch.py); that Snapshot has ``rewound`` set, so a consumer that keeps anything keyed by
revisions (caches, "what I wrote") knows to drop it: revisions now name different writes.
Transient errors back off (exponential, jittered, bounded) and retry forever: the stream only
ends when the consumer stops iterating or is cancelled.

``KeyMirror`` is that loop, applied to a ``dict`` for the common case.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from gpufleet.backoff import HALF_JITTER, backoff_delay
from gpufleet.tasks import cancel_and_wait

from .errors import EtcdCompacted, EtcdHistoryLost
from .messages import Key, KeyValue, prefix_range_end, to_bytes

if TYPE_CHECKING:
    from .client import EtcdClient

log = structlog.get_logger("gpufleet.etcd")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything under the prefix at ``revision``; replaces whatever the consumer had."""

    kvs: list[KeyValue]
    revision: int
    rewound: bool = False  # listed again because etcd's history went backwards (see top)


@dataclass(frozen=True, slots=True)
class Put:
    kv: KeyValue
    # False while more events of the same revision (one transaction) follow in this batch: a
    # consumer that must never show half a transaction acts on the batch when this is True.
    last: bool = True

    @property
    def revision(self) -> int:
        return self.kv.mod_revision


@dataclass(frozen=True, slots=True)
class Delete:
    key: bytes
    revision: int
    last: bool = True  # as Put.last

    @property
    def key_str(self) -> str:
        return self.key.decode("utf-8", "surrogateescape")


Change = Snapshot | Put | Delete


async def list_prefix(
    client: EtcdClient, prefix: Key, *, page_size: int = 1000, range_end: Key | None = None
) -> Snapshot:
    """Every key under ``prefix`` (in [prefix, range_end) with ``range_end``) at one revision,
    fetched ``page_size`` keys at a time."""
    if range_end is None:
        first = await client.get_prefix(prefix, limit=page_size)
        end = prefix_range_end(prefix)  # b"\x00" (to the end of the key space) for an empty prefix
    else:
        end = to_bytes(range_end)
        first = await client.range(prefix, end, limit=page_size)
    kvs, rev, more = list(first.kvs), first.revision, first.more
    while more and kvs:
        # The next page starts just after the last key; pinning the revision keeps the pages
        # one consistent snapshot (EtcdCompacted if compaction overtakes us: the caller relists).
        page = await client.range(kvs[-1].key + b"\x00", end, limit=page_size, revision=rev)
        kvs.extend(page.kvs)
        more = page.more
    return Snapshot(kvs, rev)


async def list_watch(
    client: EtcdClient,
    prefix: Key,
    *,
    range_end: Key | None = None,
    page_size: int = 1000,
    idle_timeout: float = 15.0,
    backoff_initial: float = 0.2,
    backoff_max: float = 10.0,
) -> AsyncIterator[Change]:
    """A Snapshot, then Put/Delete changes, forever (see the module docstring)."""
    failures = 0
    need_list = True
    rewound = False
    next_rev = 0
    while True:
        try:
            if need_list:
                snap = await list_prefix(client, prefix, page_size=page_size, range_end=range_end)
                if rewound:
                    snap = Snapshot(snap.kvs, snap.revision, rewound=True)
                need_list = rewound = False
                next_rev = snap.revision + 1
                failures = 0
                yield snap
            watch = client.watch(
                prefix, prefix=True, range_end=range_end, start_revision=next_rev, idle_timeout=idle_timeout
            )
            try:
                async for resp in watch:
                    failures = 0
                    events = resp.events
                    for i, ev in enumerate(events):
                        # etcd sends all of one revision's events in one response (no
                        # fragmenting is asked for), so the revision ends here or at the next.
                        rev = ev.kv.mod_revision
                        last = i + 1 == len(events) or events[i + 1].kv.mod_revision != rev
                        yield Put(ev.kv, last) if ev.type == "PUT" else Delete(ev.kv.key, rev, last)
                        # Advance per event, so a consumer that stops mid-batch resumes right after.
                        next_rev = ev.kv.mod_revision + 1
                    next_rev = max(next_rev, watch.next_revision)
            finally:
                watch.close()
        except EtcdHistoryLost as e:
            _log_relist(prefix, e)
            need_list = rewound = True
        except EtcdCompacted as e:
            _log_relist(prefix, e)
            need_list = True  # relisting right away is the fix, not a reason to wait
        except Exception as e:
            failures += 1
            delay = backoff_delay(failures - 1, backoff_initial, backoff_max, HALF_JITTER)
            log.warning(
                "etcd list/watch failed; retrying",
                prefix=_show(prefix),
                error=str(e),
                error_type=type(e).__name__,
                attempt=failures,
                retry_in_s=round(delay, 2),
            )
            await asyncio.sleep(delay)


def _log_relist(prefix: Key, e: EtcdHistoryLost | EtcdCompacted) -> None:
    """Why the stream lists again instead of resuming its watch."""
    if isinstance(e, EtcdHistoryLost):
        log.error(
            "etcd's history went backwards (restored from a backup, or wiped); listing again",
            prefix=_show(prefix),
            revision=e.revision,
            resume_revision=e.resume_revision,
        )
    else:
        log.warning(
            "etcd watch revision compacted; relisting", prefix=_show(prefix), compact_revision=e.compact_revision
        )


def _show(prefix: Key) -> str:
    return to_bytes(prefix).decode("utf-8", "backslashreplace")


class KeyMirror:
    """A local ``dict`` of every key under a prefix, kept current from ``list_watch``.

    ``data`` maps the key (as str, undecodable bytes kept via surrogateescape) to its KeyValue.
    ``on_change(change)`` (sync or async) runs after each change is applied; its exceptions are
    logged and do not stop the mirror. ``wait_for(pred)`` waits until ``pred(data)`` holds.
    """

    def __init__(
        self,
        client: EtcdClient,
        prefix: Key,
        *,
        on_change: Callable[[Change], Awaitable[None] | None] | None = None,
        **list_watch_kw: Any,
    ) -> None:
        self._client = client
        self.prefix = prefix
        self._on_change = on_change
        self._kw = list_watch_kw
        self.data: dict[str, KeyValue] = {}
        self.revision = 0  # the revision the mirror reflects
        self.snapshots = 0  # how many Snapshots were applied (more than 1: relisted after compaction)
        self.rewinds = 0  # how many of them followed etcd's history going backwards
        self.ready = asyncio.Event()  # set once the first Snapshot is applied
        self._cond = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> KeyMirror:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"etcd-mirror:{_show(self.prefix)}")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def wait_ready(self, timeout: float | None = None) -> None:
        async with asyncio.timeout(timeout):
            await self.ready.wait()

    async def wait_for(self, pred: Callable[[dict[str, KeyValue]], bool], timeout: float | None = None) -> None:
        async with asyncio.timeout(timeout), self._cond:
            await self._cond.wait_for(lambda: self.ready.is_set() and pred(self.data))

    def apply(self, change: Change) -> None:
        """Apply one change to ``data`` (public so other stores can reuse the rules)."""
        if isinstance(change, Snapshot):
            self.data = {kv.key_str: kv for kv in change.kvs}
            self.revision = change.revision
            self.snapshots += 1
            self.rewinds += change.rewound
        elif isinstance(change, Put):
            self.data[change.kv.key_str] = change.kv
            self.revision = change.revision
        else:
            self.data.pop(change.key_str, None)
            self.revision = change.revision

    async def _run(self) -> None:
        async for change in list_watch(self._client, self.prefix, **self._kw):
            self.apply(change)
            self.ready.set()
            async with self._cond:
                self._cond.notify_all()
            if self._on_change is not None:
                try:
                    res = self._on_change(change)
                    if isinstance(res, Awaitable):
                        await res
                except Exception:
                    log.exception("etcd mirror on_change callback failed", prefix=_show(self.prefix))
