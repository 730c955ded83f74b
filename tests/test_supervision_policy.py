"""Pure supervision policy: health window, back-off and crash loops, ports, GPU admission."""

from __future__ import annotations

import socket

import pytest

from agent.supervisor.admission import GIB, Claim, check_admission
from agent.supervisor.ports import PortPlanError, plan_ports, port_is_free
from agent.supervisor.supervision_policy import (
    HealthWindow,
    Outlier,
    OutlierPolicy,
    RestartPolicy,
    after_failure,
    after_success,
    in_rotation,
    may_eject,
)
from gpufleet.keyspace.records import GpuRecord


def test_health_window_threshold_and_ratio() -> None:
    h = HealthWindow(threshold=3, window=4)
    assert h.ratio == 1.0
    assert [h.record(ok) for ok in (False, False, True, False, False)] == [False, False, False, False, False]
    assert h.record(False) is True  # third consecutive failure
    assert h.ratio == 0.25  # window of 4: T F F F
    h.record(True)
    assert h.consecutive_failures == 0


def test_backoff_doubles_and_caps() -> None:
    p = RestartPolicy(initial_s=1, max_s=60, crash_loop_restarts=100, crash_loop_window_s=600)
    delays = [p.on_failure(now=t * 1000.0).delay_s for t in range(9)]  # far apart: no crash loop
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]


def test_crash_loop_after_five_restarts_in_ten_minutes() -> None:
    p = RestartPolicy(initial_s=1, max_s=60, crash_loop_restarts=5, crash_loop_window_s=600)
    decisions = [p.on_failure(now=t * 10.0) for t in range(6)]
    assert [d.give_up for d in decisions] == [False] * 5 + [True]
    assert "6 failures within 600s" in decisions[-1].reason


def test_failures_outside_the_window_are_forgotten() -> None:
    p = RestartPolicy(crash_loop_restarts=2, crash_loop_window_s=100)
    assert not p.on_failure(0).give_up
    assert not p.on_failure(50).give_up
    assert not p.on_failure(160).give_up  # 0 and 50 are older than 100 s: one failure in the window
    assert not p.on_failure(170).give_up  # two: 2 restarts are allowed
    assert p.on_failure(180).give_up  # three within 100 s


def test_backoff_resets_after_a_stable_run_and_on_operator_reset() -> None:
    p = RestartPolicy(initial_s=1, max_s=60, crash_loop_restarts=100, stable_after_s=60)
    assert [p.on_failure(i * 1000.0).delay_s for i in range(3)] == [1, 2, 4]
    assert p.on_failure(5000, ready_for_s=3600).delay_s == 1
    p.on_failure(6000)
    p.reset()
    assert p.on_failure(7000).delay_s == 1


def test_port_plan_explicit_allocated_and_kept() -> None:
    taken_by_others = {8101}
    plan = plan_ports(
        [("a", None), ("b", 8100), ("c", None), ("d", None)],
        base=8100,
        span=10,
        reserved={8103},
        keep={"d": 8108},
        is_free=lambda p: p not in taken_by_others,
    )
    assert plan == {"b": 8100, "a": 8102, "c": 8104, "d": 8108}


def test_port_plan_exhausted() -> None:
    with pytest.raises(PortPlanError, match=r"no free port left in 9000\.\.9001 for instance 'c'"):
        plan_ports([("a", None), ("b", None), ("c", None)], base=9000, span=2, is_free=lambda p: True)


def test_port_is_free_sees_a_bound_port() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert not port_is_free(s.getsockname()[1])


def gpu(index: int = 0, total_gib: float = 80, free_gib: float = 80, lost: bool = False) -> GpuRecord:
    return GpuRecord(
        index=index,
        uuid=f"GPU-{index}",
        name="NVIDIA A100",
        gpu_class="A100",
        memory_total_bytes=int(total_gib * GIB),
        memory_free_bytes=int(free_gib * GIB),
        memory_used_bytes=int((total_gib - free_gib) * GIB),
        lost=lost,
    )


def test_admission_fits_and_budget() -> None:
    gpus = {0: gpu()}
    assert check_admission(Claim("a", (0,), 0.4), gpus) is None
    msg = check_admission(Claim("c", (0,), 0.3), gpus, holding=[Claim("a", (0,), 0.4), Claim("b", (0,), 0.3)])
    assert msg == "GPU 0 over-committed: c (0.3) with a (0.4), b (0.3) sums to 1.00 > budget 0.95"


def test_admission_counts_instances_still_loading() -> None:
    # NVML shows 60 GiB free but "a" (0.4 = 32 GiB) is still loading: only 28 GiB are really free.
    gpus = {0: gpu(free_gib=60)}
    msg = check_admission(Claim("b", (0,), 0.4), gpus, pending=[Claim("a", (0,), 0.4)])
    assert msg is not None and msg.startswith("GPU 0 has 28.0 GiB free (after instances still loading: a)")
    assert "b needs 32.0 GiB (0.4 of 80.0 GiB)" in msg
    assert check_admission(Claim("b", (0,), 0.3), gpus, pending=[Claim("a", (0,), 0.4)]) is None


def test_admission_missing_lost_and_unreadable_gpus() -> None:
    assert check_admission(Claim("a", (1,), 0.1), {0: gpu()}) == "GPU 1 does not exist on this host (found [0])"
    assert "is lost" in (check_admission(Claim("a", (0,), 0.1), {0: gpu(lost=True)}) or "")
    unreadable = gpu()
    unreadable.memory_free_bytes = None
    unreadable.errors = {"memory": "Not Supported"}
    assert check_admission(Claim("a", (0,), 0.1), {0: unreadable}) == "GPU 0: memory could not be read (Not Supported)"


def test_admission_multi_gpu_checks_every_gpu() -> None:
    gpus = {0: gpu(0), 1: gpu(1, free_gib=10)}
    msg = check_admission(Claim("tp", (0, 1), 0.5), gpus)
    assert msg is not None and msg.startswith("GPU 1 has 10.0 GiB free")


# --- passive health (outlier ejection) -------------------------------------------------------------

P = OutlierPolicy(consecutive_failures=3, base_s=10.0, max_s=25.0, max_fraction=0.5, restart_after=3)


@pytest.mark.parametrize(
    ("ready", "ejected", "fraction", "allowed"),
    [
        (1, 0, 1.0, False),  # never the last one
        (2, 0, 0.5, True),
        (2, 1, 1.0, False),  # the other one is out already: this one is the last
        (3, 0, 0.5, True),
        (3, 1, 0.5, False),  # 2 of 3 > 50 %
        (4, 1, 0.5, True),
        (10, 0, 0.0, False),  # fraction 0: ejection off
    ],
)
def test_may_eject_caps_the_fraction_and_keeps_one(ready: int, ejected: int, fraction: float, allowed: bool) -> None:
    assert may_eject(ready, ejected, fraction) is allowed


@pytest.mark.parametrize(
    ("before", "now", "ready", "ejected", "after"),
    [
        (Outlier(), 0.0, 2, 0, Outlier(failures=1)),
        (Outlier(failures=1), 0.0, 2, 0, Outlier(failures=2)),
        (Outlier(failures=2), 5.0, 2, 0, Outlier(0, 1, 15.0, 1)),  # third in a row: ejected for base_s
        (Outlier(failures=2), 5.0, 1, 0, Outlier(0, 0, None, 1)),  # the only one: stays, a strike
        (Outlier(failures=2), 5.0, 2, 1, Outlier(0, 0, None, 1)),  # its sibling is out: stays
        (Outlier(0, 1, 15.0, 1), 9.0, 2, 1, Outlier(0, 1, 15.0, 1)),  # a late failure while ejected
        (Outlier(0, 1, 15.0, 1), 15.0, 2, 1, Outlier(0, 2, 35.0, 2)),  # half-open trial failed: 2 × base
        (Outlier(0, 2, 35.0, 2), 40.0, 2, 1, Outlier(0, 3, 65.0, 3)),  # 4 × base = 40, capped at max_s 25
    ],
)
def test_outlier_after_failure(before: Outlier, now: float, ready: int, ejected: int, after: Outlier) -> None:
    assert after_failure(before, now, P, ready, ejected) == after


def test_outlier_success_resets_and_trial_rules() -> None:
    assert after_success(Outlier(2, 3, 99.0)) == Outlier()
    ejected = Outlier(0, 1, 15.0)
    assert not in_rotation(ejected, 14.9, in_flight=0)
    assert in_rotation(ejected, 15.0, in_flight=0)  # half-open: one trial request ...
    assert not in_rotation(ejected, 15.0, in_flight=1)  # ... at a time
    assert in_rotation(Outlier(failures=2), 0.0, in_flight=7)
    off = OutlierPolicy(consecutive_failures=0)
    assert after_failure(Outlier(failures=9), 0.0, off, 5, 0) == Outlier(failures=9)


@pytest.mark.parametrize(
    ("strikes", "restart_after", "wanted"),
    [(2, 3, False), (3, 3, True), (4, 3, True), (9, 0, False)],
)
def test_outlier_asks_for_a_restart_after_strikes(strikes: int, restart_after: int, wanted: bool) -> None:
    # A hung engine behind a passing health check: probes will never restart it.
    p = OutlierPolicy(consecutive_failures=1, restart_after=restart_after)
    assert Outlier(strikes=strikes).wants_restart(p) is wanted


def test_a_lone_instance_that_fails_is_never_ejected_but_is_restarted() -> None:
    o = Outlier()
    for _ in range(9):  # nine timeouts in a row on the only instance of its model
        o = after_failure(o, 0.0, P, ready=1, ejected=0)
    assert o.ejected_until is None and o.strikes == 3 and o.wants_restart(P)


@pytest.mark.parametrize(
    ("answers", "wanted"),
    [((False,) * 9, True), ((True,) * 9, False), ((False,) * 8 + (True,), False), ((True,) + (False,) * 8, False)],
)
def test_only_silence_asks_for_a_restart(answers: tuple[bool, ...], wanted: bool) -> None:
    """Nine failures in a row on a lone instance: timeouts (a hung engine) ask for a restart;
    once it has answered a 5xx since its last success it is alive, and its errors are for
    degradation to handle, not for a restart that costs minutes of model loading."""
    o = Outlier()
    for answered in answers:
        o = after_failure(o, 0.0, P, ready=1, ejected=0, answered=answered)
    assert o.strikes == 3 and o.wants_restart(P) is wanted
    assert not after_success(o).answered
