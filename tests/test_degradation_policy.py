"""Degradation: the leader's error window and level steps, and the agent's level-1 response cache (pure)."""

from __future__ import annotations

import pytest

from agent.proxy.cache import CachedResponse, ResponseCache, StreamRecorder, cache_key
from agent.proxy.routing import classify_task
from coordinator.policy.degradation import (
    INITIAL,
    DegradationPolicy,
    ErrorWindow,
    LevelState,
    level_for,
    next_level,
)

P = DegradationPolicy()  # thresholds 5/15/30 %, window 60 s, 50 samples, hysteresis 2 %, hold 30 s
INC = 1000.0  # an agent incarnation (its started_at)

# --- ErrorWindow ---------------------------------------------------------------------------------


def test_first_observation_is_a_baseline_only():
    w = ErrorWindow(60.0)
    w.observe("a", INC, 100.0, attempts=5000, errors=4000)
    assert w.totals(100.0) == (0, 0)
    assert w.nodes() == 1
    w.observe("a", INC, 101.0, attempts=5100, errors=4010)
    assert w.totals(101.0) == (100, 10)


def test_deltas_are_summed_across_nodes():
    w = ErrorWindow(60.0)
    for node in ("a", "b", "c"):
        w.observe(node, INC, 0.0, 10, 1)
    w.observe("a", INC, 5.0, 110, 11)
    w.observe("b", INC, 5.0, 60, 1)
    w.observe("c", INC, 5.0, 10, 1)  # no change: nothing added
    w.observe("a", INC, 10.0, 130, 21)
    assert w.totals(10.0) == (170, 20)
    assert w.nodes() == 3


def test_increments_leave_the_window():
    w = ErrorWindow(60.0)
    w.observe("a", INC, 0.0, 0, 0)
    w.observe("a", INC, 10.0, 100, 50)
    w.observe("a", INC, 40.0, 200, 50)
    assert w.totals(69.9) == (200, 50)
    assert w.totals(70.0) == (100, 0)  # at > now - window_s: the one at 10 s is out at 70 s
    assert w.totals(100.0) == (0, 0)
    assert w.totals(50.0) == (0, 0)  # pruned for good, even for an earlier now


def test_out_of_order_observation_is_still_pruned_in_time():
    w = ErrorWindow(60.0)
    w.observe("a", INC, 0.0, 0, 0)
    w.observe("b", INC, 0.0, 0, 0)
    w.observe("a", INC, 50.0, 10, 0)
    w.observe("b", INC, 20.0, 10, 10)  # an older `at` observed later
    assert w.totals(81.0) == (10, 0)


def test_agent_restart_counts_the_new_incarnation_from_zero():
    w = ErrorWindow(60.0)
    w.observe("a", INC, 0.0, 5000, 100)
    w.observe("a", INC + 500, 10.0, 40, 30)  # restarted: smaller totals, all since the restart
    assert w.totals(10.0) == (40, 30)
    w.observe("a", INC + 900, 20.0, 9000, 0)  # restarted again, with larger totals than before
    assert w.totals(20.0) == (9040, 30)


def test_counter_going_backwards_counts_as_restart():
    w = ErrorWindow(60.0)
    w.observe("a", INC, 0.0, 1000, 100)
    w.observe("a", INC, 10.0, 30, 3)
    assert w.totals(10.0) == (30, 3)
    w.observe("a", INC, 20.0, 1000, 0)  # errors went backwards (attempts did not)
    assert w.totals(20.0) == (1030, 3)


def test_error_delta_is_clamped_to_the_attempt_delta():
    w = ErrorWindow(60.0)
    w.observe("a", INC, 0.0, 100, 10)
    w.observe("a", INC, 1.0, 110, 50)  # 40 errors for 10 attempts
    assert w.totals(1.0) == (10, 10)
    w.observe("a", INC, 2.0, 110, 60)  # errors without attempts: nothing recorded
    assert w.totals(2.0) == (10, 10)


def test_forget_drops_the_baseline_but_keeps_recorded_increments():
    w = ErrorWindow(60.0)
    w.observe("a", INC, 0.0, 0, 0)
    w.observe("a", INC, 1.0, 100, 10)
    w.forget("a")
    w.forget("never-seen")
    assert w.nodes() == 0
    assert w.totals(1.0) == (100, 10)
    w.observe("a", INC, 2.0, 500, 500)  # seen afresh: a baseline again
    assert w.totals(2.0) == (100, 10)


# --- next_level ----------------------------------------------------------------------------------


def at(level: int, since: float = 0.0) -> LevelState:
    return LevelState(level, since, 0.0, 0, "test")


def test_level_for_thresholds():
    t = P.thresholds
    assert [level_for(r, t) for r in (0.0, 0.0499, 0.05, 0.1499, 0.15, 0.2999, 0.30, 1.0)] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_rises_to_level_1_at_5_percent():
    s = next_level(INITIAL, 1000, 49, 100.0, P)
    assert (s.level, s.since) == (0, INITIAL.since)
    s = next_level(s, 1000, 50, 101.0, P)
    assert (s.level, s.since, s.rate, s.samples) == (1, 101.0, 0.05, 1000)
    assert "5.0 %" in s.reason and ">= 5 %" in s.reason


def test_rises_straight_to_level_3():
    s = next_level(INITIAL, 100, 40, 10.0, P)
    assert (s.level, s.since) == (3, 10.0)
    assert "40.0 %" in s.reason and ">= 30 %" in s.reason


def test_going_up_ignores_the_hold():
    s = next_level(at(1, since=99.0), 100, 20, 100.0, P)
    assert (s.level, s.since) == (2, 100.0)


def test_never_raises_below_min_samples():
    s = next_level(INITIAL, 49, 49, 10.0, P)
    assert (s.level, s.rate, s.samples) == (0, 1.0, 49)
    assert "not enough samples (49 < 50)" in s.reason
    s = next_level(at(1, since=5.0), 10, 10, 10.0, P)  # held 5 s: kept, not raised
    assert (s.level, s.since) == (1, 5.0)


def test_hysteresis_keeps_level_1_until_below_3_percent():
    s = at(1)
    for now, errors in ((100.0, 40), (200.0, 30)):  # 4 %, then exactly 3 %
        s = next_level(s, 1000, errors, now, P)
        assert (s.level, s.since) == (1, 0.0)
        assert "hysteresis" in s.reason
    s = next_level(s, 1000, 29, 300.0, P)
    assert (s.level, s.since) == (0, 300.0)


def test_min_hold_delays_going_down():
    s = next_level(at(2, since=100.0), 1000, 0, 129.0, P)
    assert (s.level, s.since) == (2, 100.0)
    assert "holding level 2" in s.reason
    s = next_level(s, 1000, 0, 130.0, P)
    assert (s.level, s.since) == (1, 130.0)


def test_steps_down_one_level_per_hold():
    s = at(3)
    levels = []
    for now in (30.0, 45.0, 60.0, 75.0, 90.0, 120.0):
        s = next_level(s, 1000, 0, now, P)
        levels.append(s.level)
    assert levels == [2, 2, 1, 1, 0, 0]


def test_steady_level_keeps_since():
    s = next_level(at(2, since=7.0), 1000, 200, 500.0, P)  # 20 %: level 2 calls for level 2
    assert (s.level, s.since, s.rate) == (2, 7.0, 0.2)
    assert ">= 15 %" in s.reason


def test_too_few_samples_steps_down_after_the_hold():
    s = next_level(at(3, since=0.0), 3, 3, 29.0, P)  # 100 % errors, but 3 attempts: no evidence
    assert (s.level, s.since) == (3, 0.0)
    s = next_level(s, 3, 3, 30.0, P)
    assert (s.level, s.since) == (2, 30.0)
    assert s.reason == "not enough samples (3 < 50): stepping down"
    s = next_level(s, 0, 0, 60.0, P)
    assert (s.level, s.rate) == (1, 0.0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"thresholds": (0.05, 0.05, 0.3)}, "thresholds"),
        ({"thresholds": (0.0, 0.1, 0.3)}, "thresholds"),
        ({"thresholds": (0.1, 0.2, 1.5)}, "thresholds"),
        ({"thresholds": (0.1, 0.2)}, "thresholds"),
        ({"window_s": 0.0}, "window_s"),
        ({"min_samples": 0}, "min_samples"),
        ({"hysteresis": 0.05}, "hysteresis"),
        ({"hysteresis": -0.01}, "hysteresis"),
        ({"min_hold_s": -1.0}, "min_hold_s"),
    ],
)
def test_policy_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DegradationPolicy(**kwargs)


# --- response cache ------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def ok(body: bytes = b"{}", status: int = 200) -> CachedResponse:
    return CachedResponse(status=status, headers=[], body=body, chunks=None)


def test_cache_key_is_canonical():
    path = "/v1/chat/completions"
    a = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}'
    b = b'{"temperature":0,\n "messages":[{"content":"hi","role":"user"}],"model":"m"}'
    assert cache_key(path, a) == cache_key(path, b)
    assert len(cache_key(path, a)) == 32
    assert cache_key(path, a) != cache_key(path, a.replace(b'"temperature": 0', b'"temperature": 1'))
    assert cache_key(path, a) != cache_key("/v1/completions", a)


def test_cache_key_stream_flag_matters():
    plain = b'{"model": "m", "prompt": "x"}'
    assert cache_key("/v1/completions", plain) != cache_key(
        "/v1/completions", b'{"model": "m", "prompt": "x", "stream": true}'
    )


@pytest.mark.parametrize(
    "body",
    [b"[1, 2]", b'"text"', b"42", b"not json", b"", b'{"a": 1', b'{"a": ' + b"[" * 5000, b'{"model": "\xff"}'],
)
def test_cache_key_refuses_non_objects(body):
    # Too deep for the decoder (RecursionError) or not UTF-8 (UnicodeDecodeError): not a key, not a 500.
    assert cache_key("/v1/completions", body) is None
    assert classify_task(body) == "text"


def test_entry_size_counts_body_or_chunks_and_headers():
    assert CachedResponse(200, [("content-type", "x")], b"12345", None).size == 5 + 13
    assert CachedResponse(200, [], None, [b"ab", b"cde"]).size == 5
    with pytest.raises(ValueError):
        CachedResponse(200, [], b"x", [b"y"])


def test_hit_then_ttl_expiry():
    clock = FakeClock()
    c = ResponseCache(ttl_s=60.0, clock=clock)
    assert c.put(b"k", ok(b"answer"))
    clock.t += 59.9
    assert c.get(b"k").body == b"answer"
    clock.t += 0.1
    assert c.get(b"k") is None
    assert (c.hits, c.misses, c.entries, c.bytes) == (1, 1, 0, 0)


def test_replacing_an_entry_restarts_its_ttl_and_keeps_bytes_right():
    clock = FakeClock()
    c = ResponseCache(clock=clock)
    c.put(b"k", ok(b"old"))
    clock.t += 50.0
    c.put(b"k", ok(b"newer"))
    clock.t += 50.0
    assert c.get(b"k").body == b"newer"
    assert (c.entries, c.bytes, c.evictions) == (1, 5, 0)


def test_lru_eviction_by_entries():
    c = ResponseCache(max_entries=2, clock=FakeClock())
    c.put(b"a", ok())
    c.put(b"b", ok())
    assert c.get(b"a") is not None  # a is now the most recently used
    c.put(b"c", ok())
    assert c.get(b"b") is None
    assert c.get(b"a") is not None and c.get(b"c") is not None
    assert (c.entries, c.evictions) == (2, 1)


def test_lru_eviction_by_bytes():
    c = ResponseCache(max_bytes=250, max_entry_bytes=100, clock=FakeClock())
    for k in (b"a", b"b"):
        c.put(k, ok(b"x" * 100))
    c.put(b"c", ok(b"x" * 60))  # 260 > 250: a goes
    assert c.get(b"a") is None
    assert (c.entries, c.bytes, c.evictions) == (2, 160, 1)


def test_oversized_and_non_200_answers_are_refused():
    c = ResponseCache(max_entry_bytes=10, max_bytes=100, clock=FakeClock())
    assert not c.put(b"big", ok(b"x" * 11))
    assert not c.put(b"err", ok(b"{}", status=503))
    assert c.put(b"fits", ok(b"x" * 10))
    assert (c.entries, c.bytes) == (1, 10)
    c.clear()
    assert (c.entries, c.bytes, len(c)) == (0, 0, 0)


def test_stream_recorder_replays_chunks_and_stops_on_overflow():
    r = StreamRecorder(max_entry_bytes=10)
    r.add(b"data: 1\n\n")
    resp = r.response(200, [])
    assert resp.chunks == [b"data: 1\n\n"] and resp.body is None and (r.size, r.overflow) == (9, False)
    r.add(b"xx")
    assert r.overflow and r.chunks == [] and r.size == 0
    r.add(b"y")  # ignored after the overflow
    assert r.chunks == [] and r.response(200, []) is None


# --- the agent's view of the level: fresh by what it saw, not by the leader's clock -----------


def test_the_agent_ignores_a_level_it_has_not_seen_refreshed_for_90_s_whatever_the_leaders_clock() -> None:
    import time
    from types import SimpleNamespace

    from agent.config import DegradationSection
    from agent.proxy.degrade import STALE_AFTER_S, Degrader
    from gpufleet.keyspace.records import DegradationRecord

    def record(updated_at: float) -> DegradationRecord:
        return DegradationRecord(level=2, error_rate=0.2, samples=500, window_s=60, epoch=7, updated_at=updated_at)

    routes = SimpleNamespace(degradation=record(time.time() + 3600), degradation_seen_at=time.monotonic())
    degrader = Degrader(SimpleNamespace(routes=routes, degradation_cfg=DegradationSection()))  # type: ignore[arg-type]
    assert degrader.level() == 2  # the leader's clock an hour ahead: still applied
    routes.degradation = record(time.time() - 3600)
    assert degrader.level() == 2  # an hour behind: still applied (was: ignored as stale)
    routes.degradation_seen_at = time.monotonic() - STALE_AFTER_S - 1
    routes.degradation = record(time.time())
    assert degrader.level() == 0  # not seen changing for 90 s: fail open, whatever the stamp says
