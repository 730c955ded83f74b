"""Small asyncio helpers every daemon loop shares.

No ``asyncio.wait_for`` in the daemons (tests/test_tasks.py checks): on Python 3.11 it swallows
a cancellation that arrives as its wait ends (CPython gh-86296, fixed in 3.12 by building it
on ``asyncio.timeout``). The cancelled task then goes on looping: in a test 98 of 2,000 loops
that waited on a poked event survived their cancel, and in bench/scale.py 4 of 1,000 agents'
publishers were still running 30 s after theirs, on a closed etcd client. ``asyncio.timeout``
keeps the cancellation; :func:`wait_set` and :func:`wait_shielded` are the two shapes the
daemons need.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background task and wait until it has ended (its ``finally`` blocks run)."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def wait_set(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait until ``event`` is set, at most ``timeout`` seconds (none: forever); whether it is
    set. Every loop's "sleep until poked or due"."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()
    return event.is_set()


async def wait_shielded(aw: Awaitable[T], timeout: float) -> T:
    """``aw``'s result, or TimeoutError after ``timeout`` seconds; the timeout (or a cancel)
    abandons the wait, not ``aw`` (a thread's read that cannot be interrupted, a process's
    exit, a pump that drains its output)."""
    async with asyncio.timeout(timeout):
        return await asyncio.shield(aw)


class Flag:
    """Set once; those watching it are called then (no task waits on it). What an attempt
    watches to be abandoned when its target goes away: a callback per attempt, where waiting
    on an ``asyncio.Event`` took a task per attempt. A watcher added after it was set is called
    at once."""

    __slots__ = ("_set", "_watchers")

    def __init__(self) -> None:
        self._set = False
        self._watchers: set[Callable[[], None]] = set()

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if self._set:
            return
        self._set = True
        for watcher in list(self._watchers):
            watcher()

    def watch(self, on_set: Callable[[], None]) -> None:
        self._watchers.add(on_set)
        if self._set:
            on_set()

    def unwatch(self, on_set: Callable[[], None]) -> None:
        self._watchers.discard(on_set)
