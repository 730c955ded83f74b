"""gpufleet/deadlines.py: asyncio.Timeout's behaviour on one shared timer."""

from __future__ import annotations

import asyncio
import math
import random

import pytest

from gpufleet.deadlines import RESOLUTION_S, Deadlines, Timed

LATE = RESOLUTION_S + 0.5  # how late a deadline may fire on a loaded 2-core machine


def now() -> float:
    return asyncio.get_running_loop().time()


async def test_a_deadline_cancels_its_block_with_a_timeout_error() -> None:
    dl = Deadlines()
    t0 = now()
    scope = dl.at(t0 + 0.05)
    with pytest.raises(TimeoutError):
        async with scope:
            await asyncio.sleep(10)
    assert 0.05 - 0.002 <= now() - t0 < 0.05 + LATE
    assert scope.expired() and len(dl) == 0


async def test_a_block_that_ends_first_is_not_touched() -> None:
    dl = Deadlines()
    async with dl.at(now() + 5) as scope:
        await asyncio.sleep(0)
    assert not scope.expired() and len(dl) == 0
    await asyncio.sleep(0.03)  # the timer for the emptied bucket, if it fires, finds nothing
    assert not scope.expired()


async def test_moved_later_and_earlier() -> None:
    dl = Deadlines()
    t0 = now()
    with pytest.raises(TimeoutError):
        async with dl.at(t0 + 0.03) as scope:
            scope.reschedule(t0 + 0.2)
            await asyncio.sleep(0.1)  # past the first time: not cancelled
            assert not scope.expired()
            scope.reschedule(t0 + 0.15)  # earlier again
            await asyncio.sleep(10)
    assert 0.15 - 0.002 <= now() - t0 < 0.15 + LATE


async def test_moved_earlier_fires_at_the_earlier_time() -> None:
    dl = Deadlines()
    t0 = now()
    with pytest.raises(TimeoutError):
        async with dl.at(t0 + 10) as scope:
            scope.reschedule(t0 + 0.05)
            await asyncio.sleep(10)
    assert now() - t0 < 0.05 + LATE


async def test_a_deadline_in_the_past_fires_at_once() -> None:
    dl = Deadlines()
    with pytest.raises(TimeoutError):
        async with dl.at(now() - 1):
            await asyncio.sleep(10)


async def test_someone_elses_cancel_is_not_turned_into_a_timeout() -> None:
    """The deadline and another cancel (the client leaving) in the same loop turn: the task
    ends cancelled, as with asyncio.Timeout."""
    dl = Deadlines()
    when = (math.ceil(now() / RESOLUTION_S) + 5) * RESOLUTION_S  # the deadline's timer is set for it
    started = asyncio.Event()

    async def body() -> None:
        async with dl.at(when):
            started.set()
            await asyncio.sleep(10)

    task = asyncio.create_task(body())
    await started.wait()
    asyncio.get_running_loop().call_at(when, task.cancel)
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_cancel_before_the_deadline_goes_through() -> None:
    dl = Deadlines()
    started = asyncio.Event()

    async def body() -> None:
        async with dl.at(now() + 10) as scope:
            started.set()
            try:
                await asyncio.sleep(10)
            finally:
                assert not scope.expired()

    task = asyncio.create_task(body())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(dl) == 0


async def test_many_deadlines_each_fires_once_in_order_on_one_timer() -> None:
    dl = Deadlines()
    t0 = now()
    fired: list[tuple[float, float]] = []
    ended_first = 0

    async def one(offset: float, work: float) -> None:
        nonlocal ended_first
        try:
            async with dl.at(t0 + offset) as scope:
                if random.random() < 0.3:
                    scope.reschedule(t0 + offset + 0.05)
                    offset += 0.05
                await asyncio.sleep(work)
            ended_first += 1
        except TimeoutError:
            fired.append((offset, now() - t0))

    rng = random.Random(7)
    jobs = [(rng.uniform(0.01, 0.3), rng.uniform(0.0, 0.4)) for _ in range(500)]
    await asyncio.gather(*(one(o, w) for o, w in jobs))
    assert len(fired) + ended_first == 500 and fired and ended_first
    for offset, at in fired:
        assert offset - 0.002 <= at < offset + LATE
    assert len(dl) == 0 and dl._timer is None and not dl._due and not dl._buckets


def test_on_uvloop_whose_timers_count_whole_milliseconds() -> None:
    """The agent's loop: its clock and timers have millisecond resolution (CLOCK_SLACK_S)."""
    import uvloop

    uvloop.run(test_many_deadlines_each_fires_once_in_order_on_one_timer())
    uvloop.run(test_someone_elses_cancel_is_not_turned_into_a_timeout())
    uvloop.run(test_moved_later_and_earlier())


async def test_a_timed_item_moved_by_every_event_fires_only_when_the_events_stop() -> None:
    """What a stream's idle watch does: each event moves its time later (an attribute write);
    it fires once, ``idle`` after the last one; nothing stays filed or armed after."""
    dl = Deadlines()
    idle = 0.5
    fired: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    class Idle(Timed):
        __slots__ = ("last",)

        def __init__(self) -> None:
            self.last = dl.now()
            super().__init__(self.last + idle)

        def fire(self, now: float) -> float | None:
            if now < self.last + idle:
                return self.last + idle
            fired.set_result(now - self.last)  # a second firing would raise here
            return None

    item = Idle()
    dl.add(item)
    for _ in range(5):  # an event every 20 ms: never idle for long
        await asyncio.sleep(0.02)
        item.last = dl.now()
    assert not fired.done()
    after = await asyncio.wait_for(fired, idle + 5)
    assert idle - 0.002 <= after < idle + LATE
    assert len(dl) == 0 and not dl._buckets
