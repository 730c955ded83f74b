"""Cancellation deadlines for many tasks on one event-loop timer.

``asyncio.timeout_at`` creates a loop timer on entry and a new one on every ``reschedule``, and
cancels it on exit: for the proxy that was three timers made and three cancelled per request
(uvloop allocates a libuv handle for each, and closing one is another callback), a measurable
share of its CPU per request at thousands of requests a second. Here deadlines are filed in
buckets of ``RESOLUTION_S`` and one timer is armed for the earliest bucket that has any: entering
a scope adds it to a set, leaving removes it, moving it later only notes the new time (it is
filed again when its old bucket comes due). A deadline fires at most ``RESOLUTION_S`` late.

A :class:`Deadline` behaves as ``asyncio.Timeout`` does (Python 3.11): when it expires inside its
``async with`` block the task is cancelled, and the block raises ``TimeoutError`` unless someone
else cancelled the task too; ``when``, ``reschedule`` and ``expired`` mean the same.

Anything else that must happen at a time moved often (a stream's idle limit, moved by every
read) is a :class:`Timed` filed with :meth:`Deadlines.add`: when its bucket comes due it says
whether it is done or when to look again, so moving it costs an attribute write.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import math
from types import TracebackType

RESOLUTION_S = 0.01
# uvloop's clock and timers count whole milliseconds: a timer may fire up to a millisecond before
# the time it was set for. Deadlines that close are due then, or the timer would spin until the
# clock moves on.
CLOCK_SLACK_S = 0.001


class _State(enum.Enum):
    CREATED = "created"
    ENTERED = "entered"
    EXPIRING = "expiring"  # the task was cancelled; the block has not ended yet
    EXPIRED = "expired"
    EXITED = "exited"


_UNFILED = -1


class Timed:
    """Something filed with :class:`Deadlines`: ``_when`` is the time it is filed for."""

    __slots__ = ("_bucket", "_when")

    def __init__(self, when: float) -> None:
        self._when = when
        self._bucket = _UNFILED

    def fire(self, now: float) -> float | None:
        """Its bucket came due (``now`` is at or past ``_when`` as filed): act and return None,
        or return the time to be looked at again (it was moved later meanwhile)."""
        raise NotImplementedError


class Deadline(Timed):
    """One ``async with`` scope that cancels its task at ``when`` (event-loop time)."""

    __slots__ = ("_cancelling", "_owner", "_state", "_task")

    def __init__(self, owner: Deadlines, when: float) -> None:
        super().__init__(when)
        self._owner = owner
        self._state = _State.CREATED
        self._task: asyncio.Task[object] | None = None
        self._cancelling = 0

    def when(self) -> float:
        return self._when

    def expired(self) -> bool:
        return self._state is _State.EXPIRING or self._state is _State.EXPIRED

    def reschedule(self, when: float) -> None:
        """Move the deadline (earlier or later) while its block runs."""
        if self._state is not _State.ENTERED and self._state is not _State.CREATED:
            raise RuntimeError(f"cannot reschedule a deadline that is {self._state.value}")
        if self._state is _State.ENTERED:
            self._owner.move(self, when)
        else:
            self._when = when

    async def __aenter__(self) -> Deadline:
        if self._state is not _State.CREATED:
            raise RuntimeError("a deadline is entered once")
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a deadline must be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        self._state = _State.ENTERED
        self._owner.add(self)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._owner.remove(self)
        if self._state is _State.EXPIRING:
            self._state = _State.EXPIRED
            assert self._task is not None
            if self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc  # our cancellation alone: we handle it
        else:
            self._state = _State.EXITED

    def fire(self, now: float) -> float | None:
        if self._when > now:
            return self._when  # moved later meanwhile
        assert self._task is not None
        self._state = _State.EXPIRING
        self._task.cancel()
        return None


class Deadlines:
    """The deadlines of one event loop (see the module docstring)."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._buckets: dict[int, set[Timed]] = {}  # bucket -> what is filed there
        self._due: list[int] = []  # heap of the buckets in _queued
        self._queued: set[int] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._armed: int | None = None  # the bucket the timer is set for
        self._firing = False

    def now(self) -> float:
        """The event loop's time (the loop is looked up once, not per call)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop.time()

    def at(self, when: float) -> Deadline:
        """A scope that expires at ``when`` (event-loop time)."""
        return Deadline(self, when)

    def __len__(self) -> int:
        """Items filed (scopes entered and not left, and others added and not removed)."""
        return sum(len(members) for members in self._buckets.values())

    def move(self, d: Timed, when: float) -> None:
        """File ``d`` for ``when``: added if it is not filed, else moved (later: lazily)."""
        d._when = when
        if d._bucket == _UNFILED:
            self.add(d)
        # Later: it stays where it is, and is filed again when that bucket comes due (most
        # moves are later: a first byte's limit giving way to the whole request's).
        elif math.ceil(when / RESOLUTION_S) < d._bucket:
            self.remove(d)
            self.add(d)

    def add(self, d: Timed) -> None:
        """File ``d`` for ``d._when``."""
        bucket = math.ceil(d._when / RESOLUTION_S)  # never before its time
        d._bucket = bucket
        members = self._buckets.get(bucket)
        if members is None:
            members = self._buckets[bucket] = set()
            if bucket not in self._queued:
                self._queued.add(bucket)
                heapq.heappush(self._due, bucket)
        members.add(d)
        if not self._firing and (self._armed is None or bucket < self._armed):
            self._arm(bucket)

    def remove(self, d: Timed) -> None:
        """Take ``d`` out (it has not fired, or fired and asked to be looked at again)."""
        bucket, d._bucket = d._bucket, _UNFILED
        members = self._buckets.get(bucket)
        if members is not None:
            members.discard(d)
            if not members:
                del self._buckets[bucket]  # its heap entry is skipped when it comes up
                if not self._buckets and not self._firing:
                    self._idle()

    def _idle(self) -> None:
        """Nothing is filed: no timer, no heap (a quiet loop has nothing of ours to run)."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._armed = None
        self._due.clear()
        self._queued.clear()

    def _arm(self, bucket: int) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        if self._timer is not None:
            self._timer.cancel()
        self._armed = bucket
        self._timer = self._loop.call_at(bucket * RESOLUTION_S, self._fire)

    def _fire(self) -> None:
        assert self._loop is not None
        self._timer = self._armed = None
        now = self._loop.time() + CLOCK_SLACK_S
        self._firing = True
        try:
            while self._due and self._due[0] * RESOLUTION_S <= now:
                bucket = heapq.heappop(self._due)
                self._queued.discard(bucket)
                for d in self._buckets.pop(bucket, ()):
                    if d._bucket != bucket:
                        continue  # removed by the firing of another in this bucket
                    d._bucket = _UNFILED  # fire may file it again itself
                    again = d.fire(now)
                    if again is not None and d._bucket == _UNFILED:
                        d._when = max(again, now + RESOLUTION_S)  # never due again in this pass
                        self.add(d)
        finally:
            self._firing = False
        while self._due and self._due[0] not in self._buckets:  # emptied since filed
            self._queued.discard(heapq.heappop(self._due))
        if self._due:
            self._arm(self._due[0])
