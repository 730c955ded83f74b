"""The leader logs a GPU class's panic mode once when it starts (and when its detail changes),
not on every pass: found on the deployed fleet, where a class in panic for a minute filled
``journalctl -p err`` with one error per second."""

from __future__ import annotations

from types import SimpleNamespace

from structlog.testing import capture_logs

from coordinator.leader import Leader


def test_panic_is_logged_once_per_change() -> None:
    leader = SimpleNamespace(_panic_logged={})
    passes = [
        {"A100": "1 of 1 nodes unhealthy"},
        {"A100": "1 of 1 nodes unhealthy"},
        {"A100": "1 of 1 nodes unhealthy"},
        {"A100": "2 of 2 nodes unhealthy"},
        {},
        {},
    ]
    with capture_logs() as logs:
        for panic in passes:
            Leader._log_panic(leader, panic)  # type: ignore[arg-type]
    assert [(e["log_level"], e["event"], e.get("detail")) for e in logs] == [
        ("error", "panic threshold reached: ejection suspended", "1 of 1 nodes unhealthy"),
        ("error", "panic threshold reached: ejection suspended", "2 of 2 nodes unhealthy"),
        ("info", "panic over: ejection resumes", None),
    ]
