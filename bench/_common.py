"""Helpers shared by the benchmarks (free ports, process CPU, percentiles)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def start_etcd(data_dir: str) -> tuple[subprocess.Popen[bytes], str]:
    """A single-member etcd on free loopback ports; returns (process, client URL) once it answers."""
    etcd_bin = shutil.which("etcd") or sys.exit("no etcd on PATH (run scripts/bootstrap)")
    cport, pport = free_port(), free_port()
    url, peer = f"http://127.0.0.1:{cport}", f"http://127.0.0.1:{pport}"
    proc = subprocess.Popen(
        [etcd_bin, "--data-dir", data_dir, "--listen-client-urls", url, "--advertise-client-urls", url,
         "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer, "--initial-cluster", f"default={peer}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    sys.exit("etcd did not start")


def etcd_puts(url: str) -> float:
    """etcd's own count of puts so far (its /metrics)."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("etcd_mvcc_put_total ") or line.startswith("etcd_debugging_mvcc_put_total "):
                return float(line.split()[1])
    return 0.0
