"""Supervision policy as pure functions and small value objects: no I/O, no clocks of their own.

The instance lifecycle (instance.py) asks these what to do; tests drive them with plain numbers.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from gpufleet.backoff import backoff_delay


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
        delay = backoff_delay(self._streak, self.initial_s, self.max_s)
        self._streak += 1
        return RestartDecision(False, delay)

    def reset(self) -> None:
        """An operator's start/restart forgives the history."""
        self._failures.clear()
        self._streak = 0


# --- passive health: outlier ejection on real requests -------------------------------------------


@dataclass(frozen=True)
class OutlierPolicy:
    """Envoy's outlier detection on consecutive gateway failures, for one node's instances.

    ``consecutive_failures`` gateway failures on real requests (timeouts, refused or reset
    connections, 5xx the backend judges the instance's fault) with no success in between eject
    an instance for ``base_s × 2^(n−1)`` (n: ejections since its last success), capped at
    ``max_s``. At most ``max_fraction`` of a model's READY instances are ejected at once, and
    never the last one: a flood of bad requests must not empty the rotation. 0 failures: off.

    Probes cannot see an engine that hangs behind a passing health check, and ejection never
    takes the last instance: ``restart_after`` strikes (the threshold reached, ejected or not)
    with no success in between ask the supervisor for a restart, if none of those failures was
    an answer. A server that answers 500s is alive: its error rate is what degradation (cache,
    fallback, static answer) and ejection are for, and a restart costs minutes of model loading
    without fixing what made it fail (a request it cannot serve, a downstream outage). One that
    does not answer at all is only fixed by a restart. 0: never."""

    consecutive_failures: int = 5
    base_s: float = 30.0
    max_s: float = 300.0
    max_fraction: float = 0.5
    restart_after: int = 3


@dataclass(frozen=True)
class Outlier:
    """One instance's passive-health record (monotonic clock)."""

    failures: int = 0  # consecutive gateway failures since the last success
    ejections: int = 0  # ejections since the last success: sets the next one's length
    ejected_until: float | None = None  # None: in rotation; past: half-open (one trial request)
    strikes: int = 0  # times the failure threshold was reached since the last success
    answered: bool = False  # some failure since the last success was an answer (a 5xx): alive

    def wants_restart(self, p: OutlierPolicy) -> bool:
        return 0 < p.restart_after <= self.strikes and not self.answered

    def ejected(self, now: float) -> bool:
        return self.ejected_until is not None and now < self.ejected_until

    def half_open(self, now: float) -> bool:
        return self.ejected_until is not None and now >= self.ejected_until


CLEAN = Outlier()  # shared: most answers find nothing to forget (the proxy's hot path)


def may_eject(ready: int, ejected: int, max_fraction: float) -> bool:
    """May one more of a model's ``ready`` instances be ejected, ``ejected`` being out already?"""
    after = ejected + 1
    return after < ready and after <= max_fraction * ready


def in_rotation(o: Outlier, now: float, in_flight: int) -> bool:
    """Routable as far as passive health goes. Half-open: one trial request at a time, so a
    still-hung instance costs one request's wait per ejection, not a burst's."""
    if o.ejected_until is None:
        return True
    return now >= o.ejected_until and in_flight == 0


def after_success(o: Outlier) -> Outlier:
    """An answer (or the first byte of one): the instance serves; forget its failures."""
    return CLEAN


def after_failure(
    o: Outlier, now: float, p: OutlierPolicy, ready: int, ejected: int, answered: bool = False
) -> Outlier:
    """A gateway failure on a real request. ``ready``: the model's READY instances on this node;
    ``ejected``: how many of them are ejected or half-open now; ``answered``: the failure was
    an answer (a 5xx), not silence (timeout, refused or reset connection)."""
    if p.consecutive_failures < 1 or o.ejected(now):
        return o  # off; or a late failure of a request sent before the ejection
    answered = o.answered or answered
    if o.half_open(now):
        # The trial failed: out again at once, for longer. It is still counted in ``ejected``,
        # so the fraction is unchanged.
        return _eject(o, now, p, answered)
    failures = o.failures + 1
    if failures < p.consecutive_failures:
        return Outlier(failures, o.ejections, None, o.strikes, answered)
    if may_eject(ready, ejected, p.max_fraction):
        return _eject(o, now, p, answered)
    return Outlier(0, o.ejections, None, o.strikes + 1, answered)  # may not be ejected: a strike all the same


def _eject(o: Outlier, now: float, p: OutlierPolicy, answered: bool) -> Outlier:
    n = o.ejections + 1
    return Outlier(0, n, now + backoff_delay(n - 1, p.base_s, p.max_s), o.strikes + 1, answered)
