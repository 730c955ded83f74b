"""gpufleet/tasks.py: the daemons' waits keep a cancellation, and no daemon uses
``asyncio.wait_for``, which on Python 3.11 swallows one that arrives as its wait ends."""

from __future__ import annotations

import ast
import asyncio
import random
import sys
from pathlib import Path

import pytest

from gpufleet.tasks import wait_set, wait_shielded

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("gpufleet", "agent", "coordinator", "gpufleet_dev", "gpuctl")


async def _loops_left_after_cancel(wait: str) -> int:
    """2,000 loops that sleep until poked or due, poked at random, then all cancelled: how many
    are still running a second later."""

    async def loop(ev: asyncio.Event) -> None:
        while True:
            if wait == "wait_set":
                await wait_set(ev, random.uniform(0, 0.002))
            else:
                try:
                    await asyncio.wait_for(ev.wait(), random.uniform(0, 0.002))
                except TimeoutError:
                    pass
            ev.clear()
            await asyncio.sleep(0)

    events = [asyncio.Event() for _ in range(2000)]
    tasks = [asyncio.create_task(loop(e)) for e in events]

    async def poke() -> None:
        while True:
            for e in random.sample(events, 200):
                e.set()
            await asyncio.sleep(0)

    poker = asyncio.create_task(poke())
    await asyncio.sleep(0.3)
    for t in tasks:
        t.cancel()
    _, pending = await asyncio.wait(tasks, timeout=1.0)
    poker.cancel()
    for t in pending:  # clean up what wait_for let run on
        t.cancel()
    for _ in range(50):
        if all(t.done() for t in pending):
            break
        for t in pending:
            t.cancel()
        await asyncio.wait(pending, timeout=0.1)
    return len(pending)


async def test_a_loop_waiting_with_wait_set_always_ends_when_cancelled() -> None:
    assert await _loops_left_after_cancel("wait_set") == 0


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="fixed in Python 3.12 (gh-86296)")
async def test_asyncio_wait_for_loses_cancellations_on_this_python() -> None:
    """Why the helpers exist: the same loops on ``asyncio.wait_for`` outlive their cancel."""
    for _ in range(5):  # a race: it shows in the first round almost always
        if await _loops_left_after_cancel("wait_for"):
            return
    pytest.fail("asyncio.wait_for kept every cancellation in 5 rounds of 2,000 loops")


async def test_wait_set_and_wait_shielded() -> None:
    ev = asyncio.Event()
    assert await wait_set(ev, 0.01) is False
    asyncio.get_running_loop().call_soon(ev.set)
    assert await wait_set(ev, 5) is True
    fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    with pytest.raises(TimeoutError):
        await wait_shielded(fut, 0.01)
    assert not fut.cancelled()  # the wait was abandoned, not the work
    fut.set_result(7)
    assert await wait_shielded(fut, 1) == 7


def test_no_daemon_code_calls_asyncio_wait_for() -> None:
    found = []
    for pkg in PRODUCT:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (
                    isinstance(node, ast.Attribute)
                    and node.attr == "wait_for"
                    and isinstance(node.value, ast.Name)
                    and node.value.id == "asyncio"
                ):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, f"asyncio.wait_for loses cancellations on Python 3.11; use gpufleet.tasks: {found}"


def test_a_flag_calls_its_watchers_once_and_late_ones_at_once() -> None:
    from gpufleet.tasks import Flag

    flag, calls = Flag(), []
    flag.watch(lambda: calls.append("early"))
    gone = lambda: calls.append("unwatched")  # noqa: E731
    flag.watch(gone)
    flag.unwatch(gone)
    flag.set()
    flag.set()  # once only
    assert calls == ["early"] and flag.is_set()
    flag.watch(lambda: calls.append("late"))
    assert calls == ["early", "late"]
