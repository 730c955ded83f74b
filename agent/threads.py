"""Blocking calls that may hang for good (a wedged NVML driver, a dead network mount), run so
that they can never hold up the agent's exit.

``asyncio.to_thread`` and ``ThreadPoolExecutor`` use non-daemon threads: the interpreter joins
them at exit (and the event loop's default executor is joined at shutdown), so a single call
stuck in the kernel keeps the agent from exiting until systemd's stop timeout SIGKILLs it. A
daemon thread of our own is simply abandoned at exit. Callers bound the wait with a timeout
(``gpufleet.tasks.wait_shielded(fut, t)``: the timeout abandons the wait, not the call, which
cannot be interrupted) and do not start a second call while one is still stuck.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def in_daemon_thread(fn: Callable[[], T], name: str) -> asyncio.Future[T]:
    """Run ``fn`` in a new daemon thread; its result (or exception) arrives in the future."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def deliver(result: T | None, error: BaseException | None) -> None:
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        try:
            result, error = fn(), None
        except BaseException as err:
            result, error = None, err
        try:
            loop.call_soon_threadsafe(deliver, result, error)
        except RuntimeError:
            pass  # the loop closed while the call hung; nobody is waiting any more

    threading.Thread(target=work, name=name, daemon=True).start()
    # A call that outlives its waiter may still fail; mark the exception retrieved so asyncio
    # does not log "exception was never retrieved" for an error already reported as a timeout.
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())
    return fut
