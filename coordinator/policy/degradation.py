"""The cluster's degradation level (docs/sources.md, Clawdbot), from the agents' proxy counters.

Levels: 0 normal; 1 the proxies answer identical requests from a response cache; 2 they send
traffic to the fallback model; 3 they answer with a static JSON body. The level follows the
cluster-wide upstream error rate ``attempt_errors / attempts`` over a sliding window::

    rate:   [0, 5 %)   [5 %, 15 %)   [15 %, 30 %)   [30 %, 1]
    level:     0           1              2              3

Agents publish *cumulative* counters (``ProxyCounters`` in their node record), so the leader turns
successive observations into increments (``ErrorWindow``) and sums those that fall in the window.
Going up is immediate: a failing cluster must shed load now. Going down is slow on purpose, one
level per ``min_hold_s`` and only once the rate is ``hysteresis`` below the level's threshold, so a
rate hovering at a threshold does not flap and each lower level has time to show it is safe.

Too few attempts in the window is not evidence of anything, so the level is never raised on it.
It is not a reason to stay degraded either: at level 3 almost no traffic reaches the model servers
(the proxies keep only a small probe share), so a quiet window steps down one level per hold.

Nothing here does I/O, reads a clock or logs: times are passed in, and ``LevelState.reason`` says
why, for the caller to log when ``level`` changes.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class DegradationPolicy:
    thresholds: tuple[float, float, float] = (0.05, 0.15, 0.30)  # rate at which levels 1, 2, 3 start
    window_s: float = 60.0
    min_samples: int = 50  # fewer attempts than this in the window: not enough evidence
    hysteresis: float = 0.02  # to go down from level L the rate must be below thresholds[L-1] - hysteresis
    min_hold_s: float = 30.0  # a level is held at least this long before going down (going up is immediate)

    def __post_init__(self) -> None:
        t = self.thresholds
        if len(t) != 3 or not all(0.0 < x <= 1.0 for x in t) or not t[0] < t[1] < t[2]:
            raise ValueError(f"thresholds must be 3 rates, strictly increasing, in (0, 1]: {t!r}")
        if not self.window_s > 0:
            raise ValueError(f"window_s must be > 0: {self.window_s!r}")
        if self.min_samples < 1:
            raise ValueError(f"min_samples must be at least 1: {self.min_samples!r}")
        # Below thresholds[0] so that every level can be left (the way down stays above 0 %).
        if not 0.0 <= self.hysteresis < t[0]:
            raise ValueError(f"hysteresis must be in [0, thresholds[0]): {self.hysteresis!r}")
        if not self.min_hold_s >= 0:
            raise ValueError(f"min_hold_s must be >= 0: {self.min_hold_s!r}")


DEFAULT_DEGRADATION = DegradationPolicy()


def level_for(rate: float, thresholds: tuple[float, ...]) -> int:
    """The level (0..3) that ``rate`` calls for, with no hysteresis: the number of thresholds reached."""
    return sum(1 for t in thresholds if rate >= t)


# --- the window ----------------------------------------------------------------------------------


class ErrorWindow:
    """Cluster-wide sliding window over per-node cumulative counters.

    Per node it keeps the last observation (incarnation, attempts, errors); each observation that
    moved the counters adds an increment ``(at, d_attempts, d_errors)``. Counters that start over
    (a new incarnation, i.e. the agent restarted, or a counter going backwards within one) count
    from 0: all they hold happened since the restart. The one exception is the first observation
    of a node by this window: its totals are since the agent's boot, maybe hours old, and a new
    leader must not count them, so that observation only sets the baseline. ``forget`` a node that
    is gone for good; its increments already recorded stay until they leave the window.
    """

    def __init__(self, window_s: float) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0: {window_s!r}")
        self.window_s = window_s
        self._last: dict[str, tuple[float, int, int]] = {}  # node -> (incarnation, attempts, errors)
        self._incs: deque[tuple[float, int, int]] = deque()  # (at, d_attempts, d_errors), sorted by at

    def observe(self, node: str, incarnation: float, at: float, attempts: int, errors: int) -> None:
        last = self._last.get(node)
        self._last[node] = (incarnation, attempts, errors)
        if last is None:
            return  # baseline only
        inc0, att0, err0 = last
        if incarnation != inc0 or attempts < att0 or errors < err0:
            d_att, d_err = attempts, errors  # started over: everything is new
        else:
            d_att, d_err = attempts - att0, errors - err0
        d_err = min(max(d_err, 0), d_att)
        if d_att <= 0:
            return
        inc = (at, d_att, d_err)
        if not self._incs or at >= self._incs[-1][0]:
            self._incs.append(inc)
        else:
            bisect.insort(self._incs, inc)  # observations out of time order stay prunable from the left

    def forget(self, node: str) -> None:
        self._last.pop(node, None)

    def totals(self, now: float) -> tuple[int, int]:
        """(attempts, errors) of the increments with ``at > now - window_s``; older ones are dropped."""
        cutoff = now - self.window_s
        while self._incs and self._incs[0][0] <= cutoff:
            self._incs.popleft()
        return sum(i[1] for i in self._incs), sum(i[2] for i in self._incs)

    def nodes(self) -> int:
        return len(self._last)


# --- the level -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LevelState:
    level: int
    since: float  # when this level was entered
    rate: float  # last computed rate (0 when no evidence)
    samples: int  # attempts in the window at the last step
    reason: str  # why this level, for the caller's log


INITIAL = LevelState(0, 0.0, 0.0, 0, "start")


def next_level(
    prev: LevelState, attempts: int, errors: int, now: float, policy: DegradationPolicy = DEFAULT_DEGRADATION
) -> LevelState:
    """The level after one step, given the window's totals. Always a new value; compare ``.level``."""
    level = prev.level
    rate = errors / attempts if attempts else 0.0
    held = now - prev.since
    may_go_down = level > 0 and held >= policy.min_hold_s

    if attempts < policy.min_samples:
        few = f"not enough samples ({attempts} < {policy.min_samples})"
        if may_go_down:
            return LevelState(level - 1, now, rate, attempts, f"{few}: stepping down")
        if level > 0:
            few += f": holding level {level} ({held:.0f} of {policy.min_hold_s:g} s)"
        return LevelState(level, prev.since, rate, attempts, few)

    seen = f"error rate {_pct(rate)} over {policy.window_s:g} s ({attempts} attempts)"
    target = level_for(rate, policy.thresholds)
    if target > level:
        return LevelState(target, now, rate, attempts, f"{seen} >= {_pct(policy.thresholds[target - 1], 'g')}")
    if target < level:
        down_below = policy.thresholds[level - 1] - policy.hysteresis
        if rate >= down_below - _EPS:
            why = f"{seen} >= {_pct(down_below, 'g')} (hysteresis): holding level {level}"
        elif not may_go_down:
            why = f"{seen}: holding level {level} ({held:.0f} of {policy.min_hold_s:g} s)"
        else:
            # One level per step: the hold at the lower level shows whether it is safe.
            return LevelState(level - 1, now, rate, attempts, f"{seen} < {_pct(down_below, 'g')}: stepping down")
        return LevelState(level, prev.since, rate, attempts, why)
    if level == 0:
        why = f"{seen} < {_pct(policy.thresholds[0], 'g')}"
    else:
        why = f"{seen} >= {_pct(policy.thresholds[level - 1], 'g')}"
    return LevelState(level, prev.since, rate, attempts, why)


# 0.05 - 0.02 is 0.030000000000000002: without a margin an error rate of exactly 3 % would count as below it.
_EPS = 1e-9


def _pct(x: float, fmt: str = ".1f") -> str:
    return f"{x * 100:{fmt}} %"
