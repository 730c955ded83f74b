"""The leader's degradation loop: agents' counters in, ``/state/degradation`` out.

Thin I/O around ``policy.degradation``: every pass feeds the node records' proxy counters to
the sliding window, steps the level, and writes the record (fenced by the leader's epoch) when
the level changes, and at least every ``refresh_s`` so agents can tell a live level from the
last word of a coordinator that is gone. A new leader starts at the level its predecessor
wrote: a leader change in the middle of an incident must not snap the cluster back to normal.
"""

from __future__ import annotations

import time

import structlog

from gpufleet.etcd import KeyValue, Op
from gpufleet.keyspace import Keyspace, decode_or_skip, encode
from gpufleet.keyspace.records import DegradationRecord, NodeRecord

from .config import DegradationSection
from .election import Election
from .metrics import CoordinatorMetrics
from .policy.degradation import INITIAL, DegradationPolicy, ErrorWindow, LevelState, next_level

log = structlog.get_logger("coordinator.degradation_loop")


def policy_from(cfg: DegradationSection) -> DegradationPolicy:
    t = cfg.thresholds
    return DegradationPolicy(
        thresholds=(t[0], t[1], t[2]),
        window_s=cfg.window_s,
        min_samples=cfg.min_samples,
        hysteresis=cfg.hysteresis,
        min_hold_s=cfg.min_hold_s,
    )


class DegradationController:
    def __init__(self, cfg: DegradationSection, keys: Keyspace, election: Election, metrics: CoordinatorMetrics):
        self.cfg = cfg
        self.policy = policy_from(cfg)
        self.keys = keys
        self.election = election
        self.metrics = metrics
        self.window = ErrorWindow(self.policy.window_s)
        self.state: LevelState = INITIAL
        self._written_at = 0.0
        self._written_level: int | None = None

    def apply(self, cfg: DegradationSection) -> None:
        """The cluster policy's [degradation] changed: the level carries on; the window starts
        anew only when its length changed."""
        self.cfg = cfg
        self.policy = policy_from(cfg)
        if self.window.window_s != self.policy.window_s:
            self.window = ErrorWindow(self.policy.window_s)

    def start_term(self, current: KeyValue | None, now: float) -> None:
        """A new term: a fresh window, and the level the previous leader left."""
        self.window = ErrorWindow(self.policy.window_s)
        rec = decode_or_skip(self.keys.degradation, current.value, DegradationRecord) if current else None
        level = rec.level if rec is not None and 0 <= rec.level <= 3 else 0
        self.state = LevelState(level, now, rec.error_rate if rec else 0.0, 0, "inherited from the previous leader")
        self._written_level = level if rec is not None else None
        self._written_at = 0.0

    def observe(self, records: dict[str, NodeRecord], now: float) -> None:
        for node, rec in records.items():
            if rec.proxy is not None:
                self.window.observe(node, rec.started_at, now, rec.proxy.attempts, rec.proxy.attempt_errors)

    def forget(self, node: str) -> None:
        self.window.forget(node)

    async def step(self, epoch: int, now: float) -> bool:
        """Advance the level; write the record if due. True when something was written."""
        if not self.cfg.enabled:
            return False
        attempts, errors = self.window.totals(now)
        prev = self.state
        self.state = next_level(prev, attempts, errors, now, self.policy)
        self.metrics.degradation_level.set(self.state.level)
        self.metrics.error_rate.set(self.state.rate)
        if self.state.level != prev.level:
            log.warning(
                "degradation level changed",
                level_from=prev.level,
                level_to=self.state.level,
                error_rate=round(self.state.rate, 4),
                samples=self.state.samples,
                reason=self.state.reason,
            )
            self.metrics.degradation_changes.inc()
        due = now - self._written_at >= self.cfg.refresh_s
        if self.state.level == self._written_level and not due:
            return False
        rec = DegradationRecord(
            level=self.state.level,
            error_rate=round(self.state.rate, 5),
            samples=self.state.samples,
            window_s=self.policy.window_s,
            epoch=epoch,
            updated_at=time.time(),
        )
        await self.election.guarded_txn([Op.put(self.keys.degradation, encode(rec))])
        self._written_level, self._written_at = self.state.level, now
        return True
