#!/usr/bin/env python3
"""Where gpu-agent's proxy spends its CPU per request: wrk at saturation against the canned
backend while py-spy samples the agent, pinned as in bench/proxy.py (agent on --proxy-cpu,
backends and wrk on --load-cpu).

    .venv/bin/python bench/proxy_profile.py [--seconds 10] [--out /tmp/proxy.speedscope]

Prints req/s, CPU per request, and the functions with the most own and total samples (py-spy's
raw output is kept beside --out). Needs py-spy (pip) and wrk (apt).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import proxy_load as load
from proxy_targets import start_agent


def user_sys(pid: int) -> tuple[float, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def summarize(raw: Path, top: int) -> str:
    """py-spy's ``--format raw`` (collapsed stacks: ``frame;frame;... count``): the functions
    with the most samples on top of the stack (own) and anywhere on it (total)."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        count = int(n)
        frames = stack.split(";")
        samples += count
        own[frames[-1]] += count
        for f in set(frames):
            total[f] += count
    out = [f"{samples} samples", "own:"]
    out += [f"  {100 * n / samples:5.1f}%  {f}" for f, n in own.most_common(top)]
    out.append("total:")
    out += [f"  {100 * n / samples:5.1f}%  {f}" for f, n in total.most_common(top)]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--proxy-cpu", type=int, default=0)
    ap.add_argument("--load-cpu", type=int, default=1)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--out", type=Path, default=Path("/tmp/proxy-profile.txt"))
    ap.add_argument("--no-profile", action="store_true", help="only req/s and CPU per request")
    args = ap.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    with tempfile.TemporaryDirectory(prefix="proxy-profile-") as d:
        tmp = Path(d)
        agent, target, _ = start_agent(tmp, args.proxy_cpu, args.load_cpu, (20.0, 4.0))
        try:
            url, pid = target.urls["canned"], agent.pid
            payload = load.body("canned")
            load.wrk(url, payload, 2, args.connections, args.load_cpu, tmp)  # warm-up
            record = None
            if not args.no_profile:
                argv = [spy, "record", "--pid", str(pid), "--rate", "250", "--format", "raw"]
                argv += ["--duration", str(args.seconds), "--output", str(args.out)]
                record = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            (u0, s0), t0 = user_sys(pid), time.monotonic()
            r = load.wrk(url, payload, args.seconds, args.connections, args.load_cpu, tmp)
            u1, s1 = user_sys(pid)
            used, n = u1 - u0 + s1 - s0, max(1, r["requests"])
            print(
                f"{r['rps']:.0f} req/s, {1e6 * used / n:.0f} µs CPU per request "
                f"({1e6 * (u1 - u0) / n:.0f} user, {1e6 * (s1 - s0) / n:.0f} system), "
                f"agent CPU {100 * used / (time.monotonic() - t0):.0f}%, non-2xx {r['non_2xx']} {r.get('error', '')}"
            )
            if record is not None:
                record.wait(timeout=args.seconds + 30)
                print(summarize(args.out, args.top))
        finally:
            agent.stop()


if __name__ == "__main__":
    main()
