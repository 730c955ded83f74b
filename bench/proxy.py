#!/usr/bin/env python3
"""Proxy vs peers, one core each: direct, gpu-agent, nginx, vllm-router and LiteLLM in one run,
and the floor: bench/proxy_floor.py's flat relay doing the agent's per-request steps, the ceiling
a Python relay reaches here (whole answers only: no SSE or stream tests).

Every proxy runs pinned to one core (``--proxy-cpu``, all its threads: started under
``taskset``), the backends and the load generators on the other (``--load-cpu``). All targets
reach the same backend processes, which gpu-agent supervises as its instances:

- ``sim``: the simulated vLLM server (gpufleet_dev.simulated_server, aiohttp) — c=1 latency;
- ``canned``: nginx answering every chat completion with one fixed JSON body — c=1 latency and
  max req/s, where the proxy and not the backend must be the bottleneck;
- ``sse``: a uvloop server streaming SSE events at ``--rate`` (20) events/s (bench/proxy_backends.py)
  — the first-event overhead and the 1,000-stream test; ``sse-slow``, the same at ``--slow-rate``
  (4) events/s — the 5,000-stream test, so that both ask 20,000 events/s of the load core.

Measured per target, as ratios against direct (no proxy) and each other from the same run: max
req/s (wrk, keep-alive, non-streaming POST) and proxy CPU per request (process CPU seconds from
/proc over requests); c=1 added latency p50/p99 (``--idle-gaps``: also with each connection idle
before each request); SSE first-event overhead; N concurrent streams:
events delivered (counted), added inter-event gap p99, listen-queue overflows
(TcpExtListenOverflows delta), RSS per open stream, load-core busy share (is the client or the
backend the bottleneck? direct tells). The peers are installed on first use into
``~/.cache/gpufleet-bench/<name>-<version>/`` (bench/proxy_targets.py); one that cannot be
installed or started is reported under ``unavailable`` and the rest still run.

Setup (Debian): apt-get install -y nginx-light wrk; PyPI reachable for the peers. Run:

    .venv/bin/python bench/proxy.py [--quick] [--targets direct,gpu-agent,floor,nginx,vllm-router,litellm]
        [--latency-only] [--idle-gaps 5,50,200]

Prints one JSON document; docs/benchmarks.md ("Proxy vs peers, one core each") records a run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import proxy_load as load
from _common import pct
from proxy_targets import (
    BACKENDS,
    STARTERS,
    Target,
    Unavailable,
    affinity,
    cpu,
    descendants,
    listen_overflows,
    rss,
    start_agent,
)

ALL = ("direct", "gpu-agent", "floor", "nginx", "vllm-router", "litellm")


def ms(x: float) -> float:
    return round(x * 1000, 3)


def core_jiffies(n: int) -> tuple[int, int]:
    """(busy, total) jiffies of CPU ``n`` so far (/proc/stat)."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{n} "):
            v = list(map(int, line.split()[1:]))
            idle = v[3] + v[4]
            return sum(v) - idle, sum(v)
    return 0, 1


class CoreMeter:
    """Busy share of a core between start and stop."""

    def __init__(self, n: int) -> None:
        self.n, self.a = n, core_jiffies(n)

    def share(self) -> float:
        b = core_jiffies(self.n)
        return round((b[0] - self.a[0]) / max(1, b[1] - self.a[1]), 3)


def settle(procs: list[int], limit: float = 60.0) -> float:
    """Wait until these processes use under 5 % of a core (a proxy still working off a test
    whose client gave up would load the next target's core); returns the seconds waited."""
    t0 = time.monotonic()
    while procs and time.monotonic() - t0 < limit:
        c0 = cpu(procs)
        time.sleep(0.5)
        if cpu(procs) - c0 < 0.025:
            break
    return round(time.monotonic() - t0, 1)


def smoke(t: Target) -> None:
    """One answer per backend through the target, before anything is measured."""
    for b in t.urls:
        stream = b.startswith("sse")
        raw = load.request(t.urls[b], load.body(b, stream=stream, max_tokens=2 if stream else 1))
        c = load.BlockingClient(t.urls[b])
        try:
            status, _, _, events = c.send(raw)
        except OSError as e:
            raise Unavailable(f"{t.name}: {b}: {e!r}") from None
        finally:
            c.close()
        if status != 200 or (stream and not events):
            raise Unavailable(f"{t.name}: {b}: HTTP {status}, {events} data: lines")


def latency_c1(targets: dict[str, Target], backend: str, n: int, gap: float = 0.0) -> dict:
    """c=1 requests, each answer whole; ``gap``: seconds each target's connection is idle before
    each request (in blocks of ten per target), as a lone client's requests come."""
    raw = {
        k: (t.urls[backend], load.request(t.urls[backend], load.body(backend)))
        for k, t in targets.items()
        if backend in t.urls
    }
    load.interleaved(raw, min(200, n))  # warm connections, caches and the peers' lazy paths
    res = load.interleaved(raw, n, block=10, pause=gap) if gap else load.interleaved(raw, n)
    base = res.get("direct")
    out = {}
    for name, r in res.items():
        v = r["total"]
        row = {"p50_ms": ms(pct(v, 50)), "p99_ms": ms(pct(v, 99)), "n": len(v)} if v else {}
        if v and base and base["total"] and name != "direct":
            row["added_p50_ms"] = ms(pct(v, 50) - pct(base["total"], 50))
            row["added_p99_ms"] = ms(pct(v, 99) - pct(base["total"], 99))
        if r["errors"]:
            row |= {"errors": r["errors"], "last_error": r["error"]}
        out[name] = row
    return out


def sse_first_event(targets: dict[str, Target], n: int, events: int, idle: bool = False) -> dict:
    """c=1 streams of ``events`` events: time to the first ``data:`` line. ``idle``: each target's
    connection idle for about a second before each request (the issue saw 3-5 ms there)."""
    raw = {
        k: (t.urls["sse"], load.request(t.urls["sse"], load.body("sse", stream=True, max_tokens=events)))
        for k, t in targets.items()
        if "sse" in t.urls  # not the floor relay: it relays whole answers only
    }
    if idle:
        res = load.interleaved(raw, n, block=1, pause=1.0 / len(raw))
    else:
        load.interleaved(raw, min(50, n), block=10)
        res = load.interleaved(raw, n, block=10)
    base = [x for x in res.get("direct", {}).get("first", []) if x]
    out = {}
    for name, r in res.items():
        v = [x for x in r["first"] if x]
        row: dict = {"n": len(v), "data_lines_per_stream": sorted(set(r["events"]))}
        if v:
            row |= {"first_event_p50_ms": ms(pct(v, 50)), "first_event_p99_ms": ms(pct(v, 99))}
            if base and name != "direct":
                row["overhead_p50_ms"] = ms(pct(v, 50) - pct(base, 50))
                row["overhead_p99_ms"] = ms(pct(v, 99) - pct(base, 99))
        if r["errors"]:
            row |= {"errors": r["errors"], "last_error": r["error"]}
        out[name] = row
    return out


def max_rps(t: Target, args: argparse.Namespace, tmp: Path) -> dict:
    procs = t.procs["canned"]
    payload = load.body("canned")
    load.wrk(t.urls["canned"], payload, 1, args.connections, args.load_cpu, tmp)  # warm-up
    c0, proxy_core, load_core = cpu(procs), CoreMeter(args.proxy_cpu), CoreMeter(args.load_cpu)
    r = load.wrk(t.urls["canned"], payload, args.seconds, args.connections, args.load_cpu, tmp)
    used = cpu(procs) - c0
    r["proxy_core_busy"], r["load_core_busy"] = proxy_core.share(), load_core.share()
    if procs and r["requests"]:
        r["cpu_us_per_request"] = round(used / r["requests"] * 1e6, 1)
    return r


def stream_test(t: Target, n: int, args: argparse.Namespace, backend: str, rate: float, extra: int) -> dict:
    """``n`` concurrent streams of ``args.stream_seconds`` at ``rate`` events/s through ``t``;
    ``extra``: ``data:`` lines this target adds to or drops from a stream (LiteLLM re-frames)."""
    events = max(2, round(args.stream_seconds * rate))
    raw = load.request(t.urls[backend], load.body(backend, stream=True, max_tokens=events))
    procs = t.procs[backend]
    rss0, lo0, c0 = rss(procs), listen_overflows(), cpu(procs)
    peak = [rss0]

    def sample() -> None:
        peak[0] = max(peak[0], rss(procs))

    proxy_core, load_core = CoreMeter(args.proxy_cpu), CoreMeter(args.load_cpu)
    ramp = args.ramp * n / 1000
    r = load.streams(t.urls[backend], raw, n, args.client_procs, ramp, args.stream_seconds, sample)
    used = cpu(procs) - c0
    per = events + 2 + extra  # the backend writes N events, a finish event and [DONE]
    gaps, first = r.pop("gaps"), r.pop("first")
    out = {
        "streams": n,
        "events_per_second_each": rate,
        "completed": r["completed"],
        "events": r["events"],
        "events_expected": n * per,
        "all_delivered": r["events"] == n * per and r["completed"] == n,
        "listen_overflows": listen_overflows() - lo0,
        "errors": r["errors"],
        "error_kinds": r["error_kinds"],
        "proxy_core_busy": proxy_core.share(),
        "load_core_busy": load_core.share(),
        "client_cpu_s": round(r["client_cpu_s"], 2),
    }
    if gaps:
        real = [g for g in gaps if g > 0]
        out |= {
            "gap_p50_ms": ms(pct(gaps, 50)),
            "gap_p99_ms": ms(pct(gaps, 99)),
            "gap_max_ms": ms(max(gaps)),
            "gaps_zero_share": round(1 - len(real) / len(gaps), 4),  # events that came in one read with the previous
        }
    if first:
        out |= {"first_event_p50_ms": ms(pct(first, 50)), "first_event_p99_ms": ms(pct(first, 99))}
    if procs:
        out["rss_before_mb"] = round(rss0 / 2**20, 1)
        out["rss_peak_mb"] = round(peak[0] / 2**20, 1)
        out["rss_kb_per_stream"] = round((peak[0] - rss0) / n / 1024, 1)
        if r["events"]:
            out["cpu_us_per_event"] = round(used / r["events"] * 1e6, 2)
    return out


def added_gap(res: dict) -> None:
    base = res.get("direct", {}).get("gap_p99_ms")
    for name, row in res.items():
        if name != "direct" and base is not None and "gap_p99_ms" in row:
            row["added_gap_p99_ms"] = round(row["gap_p99_ms"] - base, 3)


def goals(res: dict) -> list[dict]:
    """Issue 18's goals for gpu-agent, each with the value it was judged on."""
    g = []
    rps = res["max_rps"]

    def add(goal: str, value, met) -> None:
        g.append({"goal": goal, "value": value, "met": met})

    a = rps.get("gpu-agent", {}).get("rps")
    for peer, factor in (("vllm-router", 2.0), ("nginx", 0.4)):
        p = rps.get(peer, {}).get("rps")
        ratio = round(a / p, 3) if a and p else None
        add(f"req/s per core >= {factor}x {peer} (canned backend)", ratio, None if ratio is None else ratio >= factor)
    lat = res["latency_c1"]
    for backend in ("sim", "canned"):
        ag, ng = lat[backend].get("gpu-agent", {}), lat[backend].get("nginx", {})
        if "added_p50_ms" in ag and "added_p50_ms" in ng:
            d = round(ag["added_p50_ms"] - ng["added_p50_ms"], 3)
            add(f"c=1 added p50 within 0.1 ms of nginx's ({backend} backend)", d, d <= 0.1)
    ov = res["sse_first_event"].get("gpu-agent", {}).get("overhead_p50_ms")
    add("SSE first-event overhead <= 0.5 ms (p50)", ov, None if ov is None else ov <= 0.5)
    counts = [int(k.split("_")[1]) for k in res if k.startswith("streams_")]
    for i, n in enumerate(counts):  # the first test is the 1,000 streams, the second its 5,000
        s = res[f"streams_{n}"].get("gpu-agent")
        if not s:
            continue
        if i:
            add(
                f"{n:,} streams on one core sustained (every event delivered)",
                f"{s['events']}/{s['events_expected']}",
                s["all_delivered"],
            )
            continue
        add(f"{n:,} streams: every event delivered", f"{s['events']}/{s['events_expected']}", s["all_delivered"])
        gap = s.get("added_gap_p99_ms")
        add(f"{n:,} streams: added inter-event gap p99 <= 10 ms", gap, None if gap is None else gap <= 10)
        add(f"{n:,} streams: no listen-queue overflow", s["listen_overflows"], s["listen_overflows"] == 0)
        kb = s.get("rss_kb_per_stream")
        add(f"{n:,} streams: <= 16 KB RSS per open stream", kb, None if kb is None else kb <= 16)
    return g


def machine() -> dict:
    model = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        "",
    )
    mem = Path("/proc/meminfo").read_text().split()[1]
    return {
        "cpus": os.cpu_count(),
        "cpu": model,
        "mem_gib": round(int(mem) / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "somaxconn": int(Path("/proc/sys/net/core/somaxconn").read_text()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default=",".join(ALL), help=f"comma-separated subset of {','.join(ALL)}")
    ap.add_argument("--quick", action="store_true", help="a smoke run: few requests, short tests, 100/500 streams")
    ap.add_argument("--requests", type=int, help="c=1 requests per target and backend (2000; quick: 200)")
    ap.add_argument("--seconds", type=int, help="wrk duration per target (10; quick: 2)")
    ap.add_argument("--connections", type=int, default=64, help="wrk keep-alive connections")
    ap.add_argument("--streams", help="concurrent-stream tests, counts (1000,5000; quick: 100,500)")
    ap.add_argument("--stream-seconds", type=float, help="length of each stream (20; quick: 3)")
    ap.add_argument("--rate", type=float, default=20.0, help="events/s of each stream in the first stream test")
    ap.add_argument(
        "--slow-rate",
        type=float,
        default=4.0,
        help="events/s of each stream in the later tests: 5,000 x 4/s is the first test's 20,000 events/s, "
        "which the backend and the client (on one core) can produce and read",
    )
    ap.add_argument("--ramp", type=float, default=1.0, help="seconds to open each 1,000 streams")
    ap.add_argument("--client-procs", type=int, default=2, help="stream client processes (all on --load-cpu)")
    ap.add_argument(
        "--latency-only",
        action="store_true",
        help="only the c=1 latencies and SSE first-event overheads (minutes less; for A/B runs of a latency change)",
    )
    ap.add_argument(
        "--idle-gaps",
        default="",
        help="also c=1 on the canned backend with each connection idle this many ms before each request "
        "(comma-separated, e.g. 5,50,200): what a lone client's request costs once caches are cold",
    )
    ap.add_argument("--proxy-cpu", type=int, default=0)
    ap.add_argument("--load-cpu", type=int, default=1)
    args = ap.parse_args()
    defaults = {
        "requests": (2000, 200),
        "seconds": (10, 2),
        "streams": ("1000,5000", "100,500"),
        "stream_seconds": (20.0, 3.0),
    }
    for k, (full, quick) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, quick if args.quick else full)
    try:
        gaps = [float(x) for x in args.idle_gaps.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--idle-gaps: {args.idle_gaps!r} is not a comma-separated list of milliseconds")
    if any(not (gap > 0 and math.isfinite(gap)) for gap in gaps):
        ap.error(f"--idle-gaps: {args.idle_gaps!r}: each gap must be a number of milliseconds above 0")
    selected = [t.strip() for t in args.targets.split(",") if t.strip()]
    if bad := [t for t in selected if t not in ALL]:
        ap.error(f"--targets: unknown {bad}; choose from {','.join(ALL)}")
    if "direct" not in selected:
        selected.insert(0, "direct")  # every figure is relative to it
    os.sched_setaffinity(0, {args.load_cpu})  # this process and the clients it forks
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 5,000 streams: 10,000 sockets in a proxy

    result: dict = {
        "benchmark": "proxy-vs-peers",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join([".venv/bin/python", "bench/proxy.py", *sys.argv[1:]]),
        "commit": subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip(),
        # gpu-agent runs from the working tree: files under agent/ that differ from HEAD
        "agent_uncommitted": subprocess.run(
            ["git", "status", "--short", "--", "agent", "gpufleet"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent.parent,  # the paths are the checkout's, not bench/'s
        ).stdout.split("\n")[:-1],
        "machine": machine(),
        "cpus": {"proxy": args.proxy_cpu, "backends_and_load": args.load_cpu},
        "loadavg_before": os.getloadavg(),  # other work on the machine shares both cores
    }
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as d:
        tmp = Path(d)
        agent, agent_target, direct = start_agent(tmp, args.proxy_cpu, args.load_cpu, (args.rate, args.slow_rate))
        targets: dict[str, Target] = {"direct": Target("direct", direct, {b: [] for b in BACKENDS})}
        unavailable: dict[str, str] = {}
        try:
            for name in selected[1:]:
                try:
                    if name == "gpu-agent":
                        t = agent_target
                    else:
                        t = STARTERS[name](tmp, args.proxy_cpu, direct)
                    try:
                        smoke(t)
                    except Unavailable:
                        t.stop()
                        raise
                    targets[name] = t
                except Unavailable as e:
                    unavailable[name] = str(e)
            backend_pids = [p for i in agent.status_sync()["instances"] for p in descendants(i["pid"])]
            result["targets"] = {
                n: {
                    "version": t.version,
                    "threads_may_run_on_cpus": affinity([p for ps in t.procs.values() for p in ps]),
                }
                for n, t in targets.items()
                if n != "direct"
            }
            result["backends_may_run_on_cpus"] = affinity(backend_pids)
            result["unavailable"] = unavailable
            result["latency_c1"] = {b: latency_c1(targets, b, args.requests) for b in ("sim", "canned")}
            result["latency_c1_after_idle"] = {
                f"{gap:g}ms": latency_c1(targets, "canned", max(30, min(args.requests, round(8_000 / gap))), gap / 1000)
                for gap in gaps
            }
            result["sse_first_event"] = sse_first_event(targets, max(50, args.requests // 4), 3)
            result["sse_first_event_after_1s_idle"] = sse_first_event(targets, 3 if args.quick else 15, 3, idle=True)
            result["max_rps"] = {}
            for n, t in [] if args.latency_only else targets.items():
                result["max_rps"][n] = max_rps(t, args, tmp)
                settle(t.procs["canned"])
            direct_lines = result["sse_first_event"]["direct"]["data_lines_per_stream"]
            for i, n in enumerate(int(x) for x in ("" if args.latency_only else args.streams).split(",") if x):
                backend, rate = ("sse", args.rate) if i == 0 else ("sse-slow", args.slow_rate)
                res = {}
                for name, t in targets.items():
                    if backend not in t.urls:
                        continue
                    # a proxy that re-frames events (LiteLLM) delivers its own count per stream:
                    # expect what it delivered at c=1, not the backend's count
                    lines = result["sse_first_event"].get(name, {}).get("data_lines_per_stream", [])
                    extra = lines[0] - direct_lines[0] if len(lines) == 1 and len(direct_lines) == 1 else 0
                    res[name] = stream_test(t, n, args, backend, rate, extra)
                    res[name]["settle_s"] = settle(t.procs[backend])
                    time.sleep(1)  # let the closed connections' sockets go before the next target
                added_gap(res)
                result[f"streams_{n}"] = res
            rps = result["max_rps"]
            if rps.get("direct", {}).get("rps"):
                for row in rps.values():
                    row["vs_direct"] = round(row["rps"] / rps["direct"]["rps"], 3)
            result["goals"] = goals(result)
            result["loadavg_after"] = os.getloadavg()
        finally:
            for n, t in targets.items():
                if n not in ("direct", "gpu-agent"):
                    t.stop()
            agent.stop(60)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
