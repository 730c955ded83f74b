"""A front connection's phases (front.py): head, body, busy and idle, with the listener's limits
(gpufleet/httpserver.py's ``ConnectionGuard`` and ``[api]`` timeouts, as aiohttp's connections
have them), on one entry per connection in the relay's shared Deadlines.

A mixin of :class:`~agent.proxy.front.FrontProtocol`, which holds the state (its slots)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gpufleet.deadlines import Timed
from gpufleet.httpserver import REQUEST_TIMEOUT, ConnectionGuard, Phase

from .exchange import Cancellable

if TYPE_CHECKING:
    from .front import Front
    from .frontrequest import FrontRequest

# Phase's members as module globals: an Enum member looked up on its class costs about 80 ns
# more than a global (Python 3.11), and a connection changes phase twice per request.
HEAD, BODY, BUSY, IDLE = Phase.HEAD, Phase.BODY, Phase.BUSY, Phase.IDLE


class Phases:
    """The phase after each read and answer, and its limit (see the module docstring)."""

    __slots__ = ()
    # FrontProtocol's state that the phases read and write.
    front: Front
    transport: Any
    remote: str | None
    task: Cancellable | None
    _guard: ConnectionGuard
    _phase: Phase
    _timer: PhaseTimer | None
    _deadline: float | None
    _window: int
    _counted: bool
    _lingering: bool
    _between: bool
    _reading_paused: bool
    _parsing: FrontRequest | None
    _current: FrontRequest | None
    _pending_head: bytes | None
    # The reading half's: how a connection closes.
    _close_with: Callable[[bytes], None]
    force_close: Callable[[], None]

    def _settle(self, answered: bool = False) -> None:
        """The phase after a read, or after an answer: a request that came whole in one read
        goes from idle to busy without a head or body timer."""
        if self._lingering:
            return
        if self.task is not None:  # answering; the body of the request answered may still come
            req = self._parsing
            phase = BODY if req is not None and req is self._current else BUSY
        elif not self._between:  # part of a head is here
            phase = HEAD
        elif answered:
            phase = IDLE
        else:
            return  # a read of nothing but the blank lines between requests
        if phase is not self._phase:
            self._window = 0
            self._enter(phase)

    def _enter(self, phase: Phase) -> None:
        self._phase = phase
        if not self._counted:
            return
        guard = self._guard
        if phase is BUSY:  # answering: no limit of the connection's own, and not evictable
            guard.busy(self)  # type: ignore[arg-type]
            self._deadline = None
            return
        limits = guard.limits
        if phase is IDLE:
            timeout = limits.keepalive_timeout_s
            guard.waiting(self)  # type: ignore[arg-type]
        elif phase is HEAD:
            timeout = limits.header_timeout_s
            guard.waiting(self)  # type: ignore[arg-type]
        else:
            timeout = limits.body_timeout_s
            guard.busy(self)  # type: ignore[arg-type]
        # One entry per connection on the shared Deadlines (no loop timer per connection),
        # pushed back lazily: a phase moves the deadline, and an entry that comes due before it
        # is filed again for it (not a new timer per phase, per request).
        deadlines = self.front.deadlines
        deadline = self._deadline = deadlines.now() + timeout
        timer = self._timer
        if timer is None:
            timer = self._timer = PhaseTimer(self, deadline)
        deadlines.move(timer, deadline)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self.front.deadlines.remove(self._timer)
            self._timer = None

    def _timer_due(self, now: float) -> float | None:
        """The connection's entry came due: the phase's limit, or the time to look again."""
        deadline = self._deadline
        if deadline is None or not self._counted or self.transport is None:
            return None  # filed again by the next phase that has a limit
        if now < deadline:  # the deadline moved since the entry was filed
            return deadline
        self._on_timeout()
        return None

    def _on_timeout(self) -> None:
        if self._phase is HEAD:
            self._guard.timed_out("header", self.remote)
            got = not self._between
            if got and self.task is None:
                self._close_with(REQUEST_TIMEOUT)
                return
            self.force_close()
        elif self._phase is BODY:
            limits = self._guard.limits
            if self._reading_paused or self._window >= max(1, limits.body_min_rate * limits.body_timeout_s):
                self._window = 0
                self._enter(BODY)
                return
            self._guard.timed_out("body", self.remote)
            if self._pending_head is None and self.task is not None and self._current is self._parsing:
                # The handler waits for this body: its answer is the timeout.
                self._close_with(REQUEST_TIMEOUT)
                return
            self.force_close()
        elif self._phase is IDLE:
            self.force_close()


class PhaseTimer(Timed):
    """A connection's entry on the shared Deadlines (FrontProtocol._enter)."""

    __slots__ = ("conn",)

    def __init__(self, conn: Phases, when: float) -> None:
        super().__init__(when)
        self.conn = conn

    def fire(self, now: float) -> float | None:
        return self.conn._timer_due(now)
