"""Supervision policy as pure functions and small value objects: no I/O, no clocks of their own.

The instance lifecycle (instance.py) asks these what to do; tests drive them with plain numbers.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field


class InstanceState(enum.StrEnum):
    STARTING = "STARTING"  # process spawned, waiting for the backend to say it is ready
    WARMING = "WARMING"  # health passed, warm-up request in flight
    READY = "READY"  # serving traffic
    UNHEALTHY = "UNHEALTHY"  # failed probes / crashed; being taken down
    RESTARTING = "RESTARTING"  # waiting out the back-off before the next start
    FAILED = "FAILED"  # crash loop, or refused (admission, port); needs an operator or a reload
    STOPPED = "STOPPED"  # stopped on purpose


SERVING_STATES = frozenset({InstanceState.READY})


@dataclass
class HealthWindow:
    """Consecutive failures (for the restart decision) and the pass ratio of recent probes."""

    threshold: int
    window: int = 20
    consecutive_failures: int = 0
    _recent: deque[bool] = field(default_factory=deque)

    def record(self, ok: bool) -> bool:
        """Record one probe; True when the failure threshold has just been reached."""
        self._recent.append(ok)
        while len(self._recent) > self.window:
            self._recent.popleft()
        if ok:
            self.consecutive_failures = 0
            return False
        self.consecutive_failures += 1
        return self.consecutive_failures >= self.threshold

    @property
    def ratio(self) -> float:
        return sum(self._recent) / len(self._recent) if self._recent else 1.0

    def reset(self) -> None:
        self.consecutive_failures = 0


@dataclass(frozen=True)
class RestartDecision:
    give_up: bool
    delay_s: float
    reason: str = ""


@dataclass
class RestartPolicy:
    """Exponential back-off (initial, doubling, capped) with crash-loop detection.

    ``crash_loop_restarts`` failures within ``crash_loop_window_s`` mean FAILED. The back-off
    exponent resets after a run that stayed READY for ``stable_after_s``, so one crash a day
    restarts in ``initial_s`` rather than in ``max_s``.
    """

    initial_s: float = 1.0
    max_s: float = 60.0
    crash_loop_restarts: int = 5
    crash_loop_window_s: float = 600.0
    stable_after_s: float = 60.0
    _failures: deque[float] = field(default_factory=deque)
    _streak: int = 0

    def on_failure(self, now: float, ready_for_s: float = 0.0) -> RestartDecision:
        if ready_for_s >= self.stable_after_s:
            self._streak = 0
        self._failures.append(now)
        while self._failures and now - self._failures[0] > self.crash_loop_window_s:
            self._failures.popleft()
        if len(self._failures) > self.crash_loop_restarts:
            return RestartDecision(
                True,
                0.0,
                f"crash loop: {len(self._failures)} failures within {self.crash_loop_window_s:g}s "
                f"(limit {self.crash_loop_restarts} restarts)",
            )
        delay = min(self.initial_s * (2**self._streak), self.max_s)
        self._streak += 1
        return RestartDecision(False, delay)

    def reset(self) -> None:
        """An operator's start/restart forgives the history."""
        self._failures.clear()
        self._streak = 0
