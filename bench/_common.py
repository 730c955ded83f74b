"""Helpers shared by the benchmarks (process CPU, percentiles, etcd); free ports and processes come
from the local-fleet harness (gpufleet_dev.localfleet), re-exported here."""

from __future__ import annotations

import os
import sys
import time
import urllib.request
from pathlib import Path

from gpufleet_dev.localfleet import EtcdMember, FleetError, NoEtcd, free_port  # noqa: F401  (free_port: re-exported)

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def start_etcd(data_dir: str) -> tuple[EtcdMember, str]:
    """A single-member etcd of the local-fleet harness on free loopback ports, its data and log
    under ``data_dir``; returns (member, client URL) once it is healthy. Stop it with ``stop()``."""
    try:
        member = EtcdMember("bench", Path(data_dir)).start()
    except NoEtcd as e:
        sys.exit(f"{e} (run scripts/bootstrap)")
    try:
        member.wait_healthy_sync(30)
    except FleetError as e:
        member.kill()
        sys.exit(f"etcd did not start: {e}")
    return member, member.client_url


def etcd_puts(url: str) -> float:
    """etcd's own count of puts so far (its /metrics)."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("etcd_mvcc_put_total ") or line.startswith("etcd_debugging_mvcc_put_total "):
                return float(line.split()[1])
    return 0.0


class Directions:
    """Time spent in each named protocol class's ``data_received``, per call: where a relay's
    per-request work goes, split by direction (the client's side: a request in, through to its
    upstream write; the upstream's: the answer in, through to the client's write). Writes are
    made at the end of the loop's turn (gpufleet/outbox.py), in neither figure. Each timed call
    adds about 0.3 µs of its own. Installed for the whole process: a bench's flag."""

    def __init__(self, **protocols: type) -> None:
        self.spent = dict.fromkeys(protocols, 0)
        self.calls = dict.fromkeys(protocols, 0)
        for name, cls in protocols.items():
            self._time(name, cls)

    def _time(self, name: str, cls: type) -> None:
        inner = cls.data_received  # type: ignore[attr-defined]
        clock = time.perf_counter_ns
        spent, calls = self.spent, self.calls

        def data_received(protocol: object, data: bytes) -> None:
            t = clock()
            try:
                inner(protocol, data)
            finally:
                spent[name] += clock() - t
                calls[name] += 1

        cls.data_received = data_received  # type: ignore[attr-defined]

    def report(self) -> dict[str, float]:
        """µs per call of each (a call per request in the benches' one-read requests and answers)."""
        return {name: round(self.spent[name] / max(1, self.calls[name]) / 1000, 2) for name in self.spent}
