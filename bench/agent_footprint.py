#!/usr/bin/env python3
"""Footprint of an idle gpu-agent supervising 8 simulated vLLM instances.

Measures the agent process alone (not its model servers): resident memory (RSS, and PSS which
does not count shared libraries fully) and CPU share over an idle window with the default 5 s
probe interval. Baseline, side by side in the same run: supervisord (a plain process
supervisor with no health probes, metrics or GPU sampling) keeping the same 8 servers up.

    .venv/bin/python bench/agent_footprint.py [--seconds 60] [--instances 8]

Prints one JSON document. Goals: agent RSS <= 80 MB, CPU <= 1 %.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import cpu_seconds, free_port

from gpufleet import tomlwrite
from gpufleet_dev.localfleet import AgentProcess


def memory(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss"):
            out[key.lower() + "_mb"] = round(int(rest.split()[0]) / 1024, 1)
    return out


def measure(pid: int, seconds: float) -> dict[str, float]:
    c0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    c1, t1 = cpu_seconds(pid), time.monotonic()
    return {**memory(pid), "cpu_percent": round(100 * (c1 - c0) / (t1 - t0), 3), "window_s": round(t1 - t0, 1)}


def wait_ready(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"not ready: {url}")


def sim_argv(port: int, name: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "gpufleet_dev.simulated_server",
        "serve",
        name,
        "--port",
        str(port),
        "--disable-uvicorn-access-log",
    ]


def run_agent(tmp: Path, n: int, seconds: float) -> dict:
    port = free_port()
    instances = [
        {
            "name": f"sim-{i}",
            "backend": "vllm",
            "launcher": ["{python}", "-m", "gpufleet_dev.simulated_server", "serve"],
            "model": f"model-{i}",
            "gpus": [i % 4],
            "gpu_memory_fraction": 0.2,
            "args": ["--disable-uvicorn-access-log"],
        }
        for i in range(n)
    ]
    doc = {
        "agent": {"listen_port": port, "state_dir": tmp / "state", "log_dir": tmp / "logs", "log_format": "json"},
        "gpu": {"source": "simulated", "simulated": [{"name": "NVIDIA A100-SXM4-80GB"}] * 4},
        "supervisor": {"port_base": 18100},
        "instances": instances,
    }
    agent = AgentProcess(tmp, tomlwrite.dumps(doc), port).start()
    try:
        agent.wait_ready_sync(timeout=120)
        time.sleep(5)  # let start-up garbage settle before the idle window
        return {"instances": n, **measure(agent.pid, seconds)}
    finally:
        agent.stop(60)


def run_supervisord(tmp: Path, n: int, seconds: float) -> dict | None:
    exe = shutil.which("supervisord") or str(Path(sys.executable).parent / "supervisord")
    if not Path(exe).exists():
        return None
    programs = "".join(
        f"[program:sim-{i}]\ncommand={' '.join(sim_argv(19100 + i, f'model-{i}'))}\nautorestart=true\n"
        f"stdout_logfile={tmp}/sim-{i}.log\nredirect_stderr=true\n\n"
        for i in range(n)
    )
    conf = tmp / "supervisord.conf"
    conf.write_text(f"[supervisord]\nnodaemon=true\nlogfile={tmp}/supervisord.log\npidfile={tmp}/sd.pid\n\n{programs}")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for i in range(n):
            wait_ready(f"http://127.0.0.1:{19100 + i}/health")
        time.sleep(5)
        return {"instances": n, **measure(proc.pid, seconds)}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--instances", type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "a").mkdir()
        (tmp / "s").mkdir()
        agent = run_agent(tmp / "a", args.instances, args.seconds)
        baseline = run_supervisord(tmp / "s", args.instances, args.seconds)
    print(
        json.dumps(
            {
                "benchmark": "agent_footprint",
                "gpu_agent": agent,
                "baseline_supervisord": baseline or "not installed (pip install supervisor)",
                "goals": {"rss_mb": 80, "cpu_percent": 1.0},
                "meets_goals": agent["rss_mb"] <= 80 and agent["cpu_percent"] <= 1.0,
                "python": sys.version.split()[0],
                "cpus": os.cpu_count(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
