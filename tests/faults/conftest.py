"""Fixtures of the fault-injection suite: each scenario gets its own etcd (a clean keyspace), torn down
after, and no process it started may outlive it."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from etcd_fixtures import EtcdCluster


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Minutes of real faults: out of the inner loop (`pytest -m "not slow"`), in the default run.
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def etcd() -> Iterator[EtcdCluster]:
    # Overrides the module-scoped ``etcd`` of tests/etcd_fixtures.py: a fault scenario must not
    # inherit another's leader key, leases or node records.
    cluster = EtcdCluster(1).start()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def etcd3() -> Iterator[EtcdCluster]:
    """Three members of its own for one scenario (scenarios kill, freeze and restart members)."""
    cluster = EtcdCluster(3).start()
    try:
        yield cluster
    finally:
        cluster.destroy()


# --- no process outlives its scenario -------------------------------------------------------------


def _children() -> dict[int, str]:
    """Live (not zombie) direct children of this test process: pid -> command line."""
    me, out = os.getpid(), {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == me and fields[0] != "Z":
                out[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
        except (OSError, ValueError, IndexError):
            continue
    return out


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.stash[_CALL_FAILED] = report.failed


_CALL_FAILED = pytest.StashKey[bool]()


@pytest.fixture(autouse=True)
def no_leftover_processes(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each scenario (and its etcd) is torn down, nothing it started may still run: a
    leftover is killed, and fails a scenario that otherwise passed (an orphan is a bug, in the
    product or in the test's cleanup)."""
    before = set(_children())
    yield
    left = {pid: cmd for pid, cmd in _children().items() if pid not in before}
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    if left and not request.node.stash.get(_CALL_FAILED, True):
        pytest.fail(f"processes left running after the scenario: {sorted(left.values())}")
