#!/usr/bin/env python3
"""Start-to-READY and recovery with a real llama.cpp ``llama-server`` under gpu-agent.

The server is the CPU build of scripts/build-llama-server; the model a tiny random-weight llama
(tests/realbackend/tinymodel.py: 2 layers, hidden 64) that declares a 1M-token context, so what
is measured is the agent and the server's own start-up (process, KV-cache allocation, HTTP),
not weight loading. Three measurements, ``--trials`` each:

1. ``server_alone``: llama-server started by hand, to its first ``/health`` 200, and its RSS:
   with the model's own context (what llama-server does without ``-c``) and with the agent's
   default ``-c 8192``.
2. ``agent_start_to_ready``: a standalone agent started until its llama.cpp instance is READY
   (spawn under the shim, health, warm-up request), from the agent's start.
3. ``recovery_after_sigkill``: the server SIGKILLed, until the agent reports it READY again
   with a new PID (exit seen, back-off of 1 s, start, health, warm-up).

    .venv/bin/python bench/llamacpp.py [--trials 5]   # prints JSON
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "realbackend"))
sys.path.insert(0, str(Path(__file__).parent))

from _common import free_port  # noqa: E402
from tinymodel import write_tiny_llama  # noqa: E402

from gpufleet import tomlwrite  # noqa: E402
from gpufleet_dev.localfleet import AgentProcess  # noqa: E402


def llama_server() -> str:
    out = subprocess.run([str(ROOT / "scripts" / "build-llama-server"), "--cached"], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit("no llama-server built: run scripts/build-llama-server")
    return out.stdout.strip().splitlines()[-1]


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def wait_for(cond, timeout: float = 120.0, interval: float = 0.005):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := cond():
            return value
        time.sleep(interval)
    raise TimeoutError("condition not met")


def server_alone(binary: str, model: Path, ctx: str | None) -> dict:
    port = free_port()
    argv = [binary, "-m", str(model), "--port", str(port), "-t", "1"] + (["-c", ctx] if ctx else [])
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: http_status(f"http://127.0.0.1:{port}/health") == 200)
        ready_s = time.monotonic() - t0
        rss_kb = int(Path(f"/proc/{proc.pid}/status").read_text().split("VmRSS:")[1].split()[0])
    finally:
        proc.terminate()
        proc.wait()
    return {"ready_s": ready_s, "rss_mb": rss_kb / 1024}


def status(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/status", timeout=2) as r:
        return json.loads(r.read())


def instance(port: int) -> dict:
    try:
        return next(i for i in status(port)["instances"] if i["name"] == "llama")
    except (OSError, StopIteration):
        return {}


def agent_trial(binary: str, model: Path, tmp: Path) -> tuple[float, float]:
    port = free_port()
    instance = {
        "name": "llama",
        "backend": "llamacpp",
        "launcher": [binary],
        "model": model,
        "served_model_name": "tiny",
        "cpu_quota": 1.0,
    }
    doc = {
        "agent": {"listen_port": port, "state_dir": tmp / "state", "log_dir": tmp / "logs", "log_format": "json"},
        "gpu": {"source": "simulated", "simulated": [{"name": "NVIDIA A10"}]},
        "supervisor": {"port_base": free_port(), "port_span": 1},
        "instances": [instance],
    }
    t0 = time.monotonic()
    agent = AgentProcess(tmp, tomlwrite.dumps(doc), port).start()
    try:
        first = wait_for(lambda: (i := instance(port)).get("state") == "READY" and i)
        start_s = time.monotonic() - t0
        t1 = time.monotonic()
        os.kill(first["pid"], signal.SIGKILL)
        wait_for(
            lambda: (
                (i := instance(port)).get("state") == "READY"
                and i["restarts"] > first["restarts"]
                and i["pid"] != first["pid"]
            )
        )
        recovery_s = time.monotonic() - t1
    finally:
        agent.stop(60)
    return start_s, recovery_s


def summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=5)
    args = ap.parse_args()
    binary = llama_server()
    with tempfile.TemporaryDirectory() as d:
        model = write_tiny_llama(Path(d) / "tiny.gguf")
        alone = {}
        for label, ctx in (("model_context_1M", None), ("agent_default_8192", "8192")):
            runs = [server_alone(binary, model, ctx) for _ in range(args.trials)]
            alone[label] = {
                "ready_s": summary([r["ready_s"] for r in runs]),
                "rss_mb": summary([r["rss_mb"] for r in runs]),
            }
        starts, recoveries = [], []
        for i in range(args.trials):
            tmp = Path(d) / f"agent{i}"
            tmp.mkdir()
            s, r = agent_trial(binary, model, tmp)
            starts.append(s)
            recoveries.append(r)
    out = {
        "llama_server": binary,
        "trials": args.trials,
        "server_alone": alone,
        "agent_start_to_ready_s": summary(starts),
        "recovery_after_sigkill_s": summary(recoveries),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
