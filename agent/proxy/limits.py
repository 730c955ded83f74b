"""Per-model concurrency limit with a bounded queue: a full queue answers 429 at once.

Queueing here (rather than in the backend) keeps a burst from pushing a model server's own
queue so deep that every request in it times out; clients get a fast, retryable 429 instead.
"""

from __future__ import annotations

import asyncio
from collections import deque


class QueueFull(Exception):
    pass


class ModelGate:
    def __init__(self, max_concurrency: int, max_queue: int) -> None:
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def try_acquire(self) -> bool:
        """A slot now if one is free and nobody queues for it; False: ``acquire`` must wait."""
        if self.active < self.max_concurrency and not self._waiters:
            self.active += 1
            return True
        return False

    async def acquire(self) -> None:
        if self.try_acquire():
            return
        if len(self._waiters) >= self.max_queue:
            raise QueueFull(f"{self.active} requests running and {len(self._waiters)} queued")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except BaseException:
            if fut in self._waiters:
                self._waiters.remove(fut)
            elif not fut.cancelled():
                self.release()  # the slot was handed to us as we were cancelled: pass it on
            raise

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot moves to the waiter; active stays the same
                return
        self.active -= 1
