"""Whether the proxy may send an instance requests: narrower than READY.

A READY instance is out of rotation while its last probe failed (active health) or while real
requests found it failing (passive health: ``policy.after_failure``, Envoy's outlier ejection).
Attempts waiting on it register a callback (``watch``); leaving rotation calls them, so the
proxy moves requests off a frozen server in seconds instead of waiting for its deadline.

The decisions are the pure functions in policy.py; this holds one instance's share of state,
logs what changed, and is driven by the instance (probes, state changes) and the proxy (each
attempt's outcome).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .supervision_policy import CLEAN, OutlierPolicy, after_failure, after_success, in_rotation


class Rotation:
    def __init__(self, log: Any) -> None:
        self.log = log
        self.probe_failed = False  # the last probe failed: no new requests (unless nothing else)
        self.outlier = CLEAN
        self.restart_why: str | None = None  # passive health asks the supervisor for a restart
        self._why = ""  # the failure that caused the current ejection
        self._watchers: set[Callable[[], None]] = set()

    def reset(self) -> None:
        """A new run (READY after a start or an adoption): nothing held against it."""
        self.probe_failed = False
        self.outlier = CLEAN
        self.restart_why = None

    def routable(self, in_flight: int, suspect_ok: bool) -> bool:
        return (suspect_ok or not self.probe_failed) and in_rotation(self.outlier, time.monotonic(), in_flight)

    @property
    def ejected(self) -> bool:
        """Ejected, or half-open until a trial request succeeds."""
        return self.outlier.ejected_until is not None

    # --- attempts waiting on the instance ----------------------------------------------------

    def watch(self, on_leave: Callable[[], None]) -> None:
        self._watchers.add(on_leave)

    def unwatch(self, on_leave: Callable[[], None]) -> None:
        self._watchers.discard(on_leave)

    def leave(self) -> int:
        """The instance left rotation: tell every attempt waiting on it. Returns how many."""
        watchers = list(self._watchers)
        for on_leave in watchers:
            on_leave()
        return len(watchers)

    # --- passive health ----------------------------------------------------------------------

    def success(self) -> None:
        if self.outlier is CLEAN:
            return  # the common case, on the proxy's hot path
        if self.outlier.ejections:
            self.log.info("instance back in rotation: a trial request succeeded")
        self.outlier = after_success(self.outlier)

    def failure(self, detail: str, policy: OutlierPolicy, ready: int, ejected: int, answered: bool = False) -> bool:
        """A gateway failure of a real request; ``ready``/``ejected``: the model's READY
        instances on this node and how many others are ejected; ``answered``: a 5xx, not
        silence. True when just ejected."""
        now = time.monotonic()
        before = self.outlier
        self.outlier = after_failure(before, now, policy, ready, ejected, answered)
        if self.outlier.wants_restart(policy) and self.restart_why is None:
            self.restart_why = (
                f"failed real requests {self.outlier.strikes} times in a row "
                f"({policy.consecutive_failures} consecutive gateway failures each; last: {detail})"
            )
        if self.outlier.ejections <= before.ejections:
            return False
        self._why = detail
        self.log.warning(
            "instance ejected: failing real requests",
            ejection=self.outlier.ejections,
            for_s=round((self.outlier.ejected_until or now) - now, 1),
            last=detail,
        )
        self.leave()
        return True

    def describe(self) -> str | None:
        """For the instance's ``last_error`` while ejected; None otherwise."""
        o, now = self.outlier, time.monotonic()
        if o.ejected_until is None:
            return None
        if o.ejected(now):
            what = f"ejected for {o.ejected_until - now:.0f}s more (ejection {o.ejections})"
        else:
            what = f"ejection {o.ejections} over: the next request is a trial"
        return f"{what}; last failure: {self._why}"
