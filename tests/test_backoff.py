"""gpufleet.backoff: the one back-off rule, table-tested."""

from __future__ import annotations

import pytest

from agent.supervisor.supervision_policy import RestartPolicy
from gpufleet.backoff import HALF_JITTER, NO_JITTER, backoff_delay


@pytest.mark.parametrize(
    ("attempt", "initial", "cap", "want"),
    [
        (0, 1.0, 60.0, 1.0),
        (1, 1.0, 60.0, 2.0),
        (5, 1.0, 60.0, 32.0),
        (6, 1.0, 60.0, 60.0),  # 64 capped
        (10_000, 1.0, 60.0, 60.0),  # a long streak neither overflows nor grows
        (0, 0.05, 1.0, 0.05),  # the etcd transport's pause between rounds
        (4, 0.05, 1.0, 0.8),
        (5, 0.05, 1.0, 1.0),
        (3, 0.5, 0.5, 0.5),  # cap below the doubling
    ],
)
def test_exponential_and_capped(attempt: int, initial: float, cap: float, want: float) -> None:
    assert backoff_delay(attempt, initial, cap) == pytest.approx(want)
    assert backoff_delay(attempt, initial, cap, NO_JITTER) == pytest.approx(want)


@pytest.mark.parametrize(("draw", "want"), [("lo", 5.0), ("hi", 10.0), ("mid", 7.5)])
def test_jitter_scales_the_capped_delay(draw: str, want: float) -> None:
    def uniform(lo: float, hi: float) -> float:
        return {"lo": lo, "hi": hi, "mid": (lo + hi) / 2}[draw]

    # 0.5 × 2**10 is capped at 10 first, then jittered into [5, 10]
    assert backoff_delay(10, 0.5, 10.0, HALF_JITTER, uniform) == pytest.approx(want)


def test_jitter_stays_in_range() -> None:
    for attempt in range(12):
        d = backoff_delay(attempt, 0.2, 10.0, HALF_JITTER)
        full = min(10.0, 0.2 * 2**attempt)
        assert full * 0.5 <= d <= full


def test_negative_attempt_is_a_bug() -> None:
    with pytest.raises(ValueError):
        backoff_delay(-1, 1.0, 60.0)


def test_restart_policy_delays_are_the_shared_rule() -> None:
    p = RestartPolicy(initial_s=1.0, max_s=8.0, crash_loop_restarts=100)
    delays = [p.on_failure(float(i)).delay_s for i in range(6)]
    assert delays == [backoff_delay(i, 1.0, 8.0) for i in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
