#!/usr/bin/env python3
"""Soak: steady traffic for minutes while serving agents and the leader are SIGKILLed and restarted.

The fleet of bench/failover.py on loopback, production defaults: one etcd, coordinators c1 and
c2, five agents with simulated GPUs each supervising one simulated vLLM server of model ``m``.
a100-4 is the entry node, its own instance stopped through the admin API, so every request
entering there is forwarded by route weight to a100-1, a100-2, a100-3 (h100-1 is another class).

For ``--minutes``, through the entry agent's proxy:

- **Traffic.** Non-streaming chat at ``--rate`` requests/s from ``--workers`` workers
  (failover.py's ``load``), and ``--stream-rate`` streaming chats/s, each read to its end, counted
  apart. A request succeeds with HTTP 200; a stream also needs its body to end with
  ``data: [DONE]``. Status 0 is a client-side error (connection, 30 s timeout); -1 a stream
  answered 200 that did not end with ``[DONE]``.
- **Kills.** Every ``--kill-every`` s a SIGKILL of one serving A100 agent, a100-1..3 in turn (its
  model server dies with it by PDEATHSIG), started again ``--restart-after`` s later with the same
  config and ports, like systemd's Restart=always/RestartSec; every ``--kill-leader-every``-th
  kill is of the leading coordinator instead, restarted the same way. A victim not yet back in the
  route is passed over for the next one. With the kill as zero, polling the route every 50 ms:
  ``route_out_s`` / ``route_down_s`` until the route first shows the victim not READY / DOWN
  (bounded by the rest of the agent's 10 s lease), ``route_ready_again_s`` until it is READY again
  (restart, instance start, then the leader's readmission: DEGRADED until 3 good samples 5 s
  apart; no outlier-ejection hold, as the leader forgets a DOWN node's instance history), and the
  requests that failed in between. For the leader: ``takeover_s`` until a coordinator's ``/v1/status`` says
  ``is_leader`` with a new epoch (≈ the rest of the 15 s lease; usually the standby, but the
  victim, back after 10 s, campaigns too and may win: ``new_leader``), then until the route is
  re-stamped with the new epoch (after the new leader's 10 s grace period).
- **Memory.** Every ``--sample-every`` s, RSS and PSS (``/proc/PID/smaps_rollup``) of etcd, the
  entry agent, the h100-1 agent (never killed) and the coordinators, one series per incarnation
  (a restart starts a new series). Reported: first sample after ``--warmup`` s vs the last, and
  the least-squares slope in MB per hour.

Traffic goes on after the last kill until every victim is back (at most ``--recovery-timeout``),
so that each kill's window is measured under load. Then everything is stopped and leftover
model-server processes are reported (there must be none).

    .venv/bin/python bench/soak.py [--minutes 10] [--rate 50] [--kill-every 60]

Needs ``etcd`` on PATH. Prints one JSON document; every process started is stopped at the end,
also on errors and Ctrl-C (a partial report is still printed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).parent))
from _common import cpu_seconds, pct
from failover import (
    AGENTS,
    ARTICLE_001_MEAN_RECOVERY_S,
    BODY,
    CHAT,
    ENTRY,
    TOKEN,
    Agent,
    Coordinator,
    Fleet,
    Proc,
    Sample,
    ep_state,
    load,
    log_events,
    route,
    serving_ready,
    wait_route,
)

from gpufleet.etcd import EtcdClient
from gpufleet.logsetup import configure_logging
from gpufleet_dev.localfleet import Daemon

VICTIMS = ["a100-1", "a100-2", "a100-3"]
WATCHED_AGENTS = [ENTRY, "h100-1"]  # never killed: their memory series span the whole run
ARTICLE_001_AVAILABILITY_PERCENT = 99.98
STREAM_BODY = {**BODY, "stream": True}


async def stream_load(base: str, rate: float, stop: asyncio.Event, out: list[Sample]) -> None:
    """Open loop: one stream every 1/rate s, each in its own task, so a slow stream delays no other."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:

        async def one() -> None:
            t0 = time.time()
            try:
                async with http.post(base + CHAT, json=STREAM_BODY) as r:
                    body = await r.read()
                    status = -1 if r.status == 200 and not body.rstrip().endswith(b"data: [DONE]") else r.status
            except (aiohttp.ClientError, TimeoutError):
                status = 0
            out.append(Sample(t0, time.time(), status))

        tasks: set[asyncio.Task[None]] = set()
        nxt = time.monotonic()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, nxt - time.monotonic()))
            if stop.is_set():
                break
            t = asyncio.create_task(one())
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            nxt = max(nxt + 1 / rate, time.monotonic())  # fallen behind: no burst to catch up
        await asyncio.gather(*tasks)


class RouteWatch:
    """The route of ``m``, polled every 50 ms: each node's state, since when, and every change."""

    def __init__(self, etcd: EtcdClient) -> None:
        self.etcd = etcd
        self.state: dict[str, str | None] = {}
        self.since: dict[str, float] = {}
        self.changes: list[tuple[float, str, str | None]] = []
        self.panic: list[tuple[float, tuple[str, ...]]] = [(0.0, ())]
        self.epoch: int | None = None
        self.changed = asyncio.Condition()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):  # a failed read keeps the last view; the next poll retries
                r = await route(self.etcd)
                now = time.time()
                async with self.changed:
                    for n in AGENTS:
                        s = ep_state(r, n)
                        if s != self.state.get(n, "unset"):
                            self.state[n], self.since[n] = s, now
                            self.changes.append((now, n, s))
                    if r is not None:
                        self.epoch = r.epoch
                        if tuple(r.panic_classes) != self.panic[-1][1]:
                            self.panic.append((now, tuple(r.panic_classes)))
                    self.changed.notify_all()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.05)

    async def wait(self, pred: Callable[[], bool], timeout: float) -> bool:
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(pred), max(0.0, timeout))
                return True
            except TimeoutError:
                return False

    def panic_during(self, t0: float, t1: float) -> list[str]:
        active = [cls for t, cls in self.panic if t <= t0][-1:] + [cls for t, cls in self.panic if t0 < t <= t1]
        return sorted({c for cls in active for c in cls})


def memory_mb(pid: int) -> tuple[float, float | None]:
    """RSS and (when smaps_rollup is readable) PSS, in MB."""
    rss = next(int(ln.split()[1]) for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln[:6] == "VmRSS:")
    pss = None
    with contextlib.suppress(OSError, StopIteration):
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
        pss = next(int(ln.split()[1]) for ln in lines if ln.startswith("Pss:")) / 1024
    return rss / 1024, pss


def slope_mb_per_h(points: list[tuple[float, float]]) -> float | None:
    if len(points) < 2:
        return None
    mt, mv = statistics.fmean(t for t, _ in points), statistics.fmean(v for _, v in points)
    den = sum((t - mt) ** 2 for t, _ in points)
    return round(sum((t - mt) * (v - mv) for t, v in points) / den * 3600, 2) if den else None


def ms(v: float) -> float:
    return round(v * 1000, 1)


@dataclass
class Soak:
    fleet: Fleet
    args: argparse.Namespace
    t0: float = 0.0  # wall clock (as in Samples and RouteWatch) when traffic started
    plain: list[Sample] = field(default_factory=list)
    streams: list[Sample] = field(default_factory=list)
    kills: list[dict[str, Any]] = field(default_factory=list)
    # (name, pid) -> [(t, rss_mb, pss_mb, cpu_s)]; a new pid is a new incarnation
    memory: dict[tuple[str, int], list[tuple[float, float, float | None, float]]] = field(default_factory=dict)
    busy: set[str] = field(default_factory=set)  # victims not back yet (agents, coordinator idents)
    watch: RouteWatch | None = None
    entry_log_offset: int = 0

    def rel(self, t: float) -> float:
        return round(t - self.t0, 3)

    # --- memory -----------------------------------------------------------------------------

    async def sample_memory(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            procs: list[tuple[str, Daemon | None]] = [("etcd", self.fleet.etcd)]
            procs += [(f"agent {n}", self.fleet.agents[n].proc) for n in WATCHED_AGENTS]
            procs += [(f"coordinator {c.ident}", c.proc) for c in self.fleet.coords.values()]
            for name, p in procs:
                if p is not None and p.running():
                    with contextlib.suppress(OSError, StopIteration):  # it may die between running() and the read
                        rss, pss = memory_mb(p.pid)
                        self.memory.setdefault((name, p.pid), []).append((time.time(), rss, pss, cpu_seconds(p.pid)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.args.sample_every)

    def memory_summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        incarnation: Counter[str] = Counter()
        for (name, pid), pts in self.memory.items():
            incarnation[name] += 1
            after = [p for p in pts if p[0] >= pts[0][0] + self.args.warmup]
            warm = len(after) >= 2
            pts_used = after if warm else pts  # too short a series: all of it, flagged
            first, last = pts_used[0], pts_used[-1]
            s: dict[str, Any] = {"pid": pid, "samples": len(pts), "series_s": [self.rel(pts[0][0]), self.rel(last[0])]}
            s["first_after_warmup_s"] = self.rel(first[0]) if warm else None
            s["growth_window_s"] = round(last[0] - first[0], 1)  # slopes over a few minutes are mostly GC noise
            for i, kind in ((1, "rss"), (2, "pss")):
                if first[i] is None or last[i] is None:
                    continue
                s[f"{kind}_first_mb"], s[f"{kind}_last_mb"] = round(first[i], 1), round(last[i], 1)
                s[f"{kind}_growth_mb"] = round(last[i] - first[i], 2)
                s[f"{kind}_slope_mb_per_h"] = slope_mb_per_h([(p[0], p[i]) for p in pts_used if p[i] is not None])
            if last[0] > pts[0][0]:
                s["cpu_percent"] = round((last[3] - pts[0][3]) / (last[0] - pts[0][0]) * 100, 1)
            out[f"{name} #{incarnation[name]}" if name.startswith("coordinator") else name] = s
        return out

    # --- kills ------------------------------------------------------------------------------

    async def kill_agent(self, http: aiohttp.ClientSession, node: str) -> None:
        assert self.watch is not None
        watch, a = self.watch, self.fleet.agents[node]
        rec: dict[str, Any] = {"kind": "agent", "victim": node}
        self.kills.append(rec)
        try:
            self.fleet.model_pids |= await asyncio.to_thread(a.model_pids)  # checked for leftovers at the end
            kill_at = rec["_t0"] = time.time()
            rec["at_s"] = self.rel(kill_at)
            a.proc.signal(signal.SIGKILL)
            restart = asyncio.create_task(self.restart_agent(http, a, kill_at, rec))
            failed = lambda: restart.done() and not restart.cancelled() and restart.exception() is not None  # noqa: E731
            try:
                if not await watch.wait(lambda: watch.state.get(node) != "READY", 60):
                    raise RuntimeError("the route did not take the victim out within 60 s")
                rec["route_out_s"] = round(watch.since[node] - kill_at, 3)
                left = self.args.recovery_timeout - (time.time() - kill_at)
                await watch.wait(lambda: watch.state.get(node) == "READY" or failed(), left)
                back = watch.state.get(node) == "READY"
            finally:
                await restart  # its error, if any, is the one recorded
            end = watch.since[node] if back else time.time()
            rec["_t1"] = end
            down = [t for t, n, s in watch.changes if n == node and s == "DOWN" and kill_at <= t <= end]
            rec["route_down_s"] = round(down[0] - kill_at, 3) if down else None
            rec["route_ready_again_s"] = round(end - kill_at, 3) if back else None
            rec["panic_classes_seen"] = watch.panic_during(kill_at, end)
        except Exception as e:
            rec["error"] = repr(e)
        finally:
            self.busy.discard(node)

    async def restart_agent(self, http: aiohttp.ClientSession, a: Agent, kill_at: float, rec: dict) -> None:
        await self._restart_later(a.proc, kill_at, rec, lambda: self.fleet.start_agent(a.node))

        async def ready() -> bool:
            async with http.get(a.base + "/v1/status") as r:
                insts = (await r.json())["instances"]
            self.fleet.model_pids |= {i["pid"] for i in insts if i.get("pid")}
            return all(i["state"] == "READY" for i in insts)

        await self._until(a.proc, ready, 120, f"{a.node} READY after its restart")
        rec["agent_instance_ready_s"] = round(time.time() - kill_at, 3)

    async def _restart_later(self, proc: Proc, kill_at: float, rec: dict, start: Callable[[], object]) -> None:
        """Once the killed process is reaped, start it again ``--restart-after`` s after the kill."""
        assert proc.proc is not None
        await asyncio.to_thread(proc.proc.wait, 30)
        await asyncio.sleep(max(0.0, kill_at + self.args.restart_after - time.time()))  # systemd's RestartSec
        start()
        rec["restarted_s"] = round(time.time() - kill_at, 3)

    async def _until(self, proc: Proc, probe: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
        # Polled here rather than with the Fleet's blocking waits: a thread blocked in one would
        # hold up asyncio.run's exit (and so the cleanup) on Ctrl-C.
        deadline = time.monotonic() + timeout
        while True:
            proc.check()
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                if await probe():
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"not {what} within {timeout:.0f} s")
            await asyncio.sleep(0.1)

    async def kill_leader(self, http: aiohttp.ClientSession) -> None:
        assert self.watch is not None
        rec: dict[str, Any] = {"kind": "leader"}
        self.kills.append(rec)
        old = await asyncio.to_thread(self.fleet.leader)
        if old is None or self.busy & set(self.fleet.coords):
            rec["skipped"] = "no leader" if old is None else "a coordinator is not back yet"
            return
        ident = rec["victim"] = old.ident
        self.busy.add(ident)
        try:
            async with http.get(old.base + "/v1/status") as r:
                old_epoch = (await r.json())["epoch"]
            kill_at = rec["_t0"] = time.time()
            rec["at_s"] = self.rel(kill_at)
            old.proc.signal(signal.SIGKILL)
            restart = asyncio.create_task(self.restart_coordinator(http, old, kill_at, rec))
            try:
                # Usually the standby; but the victim, restarted after 10 s, campaigns too when the
                # old 15 s lease runs out, and may win.
                epoch = None
                while time.time() - kill_at < 60 and epoch is None:
                    for c in list(self.fleet.coords.values()):
                        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                            async with http.get(c.base + "/v1/status") as r:
                                st = await r.json()
                            if st["is_leader"] and st["epoch"] != old_epoch:
                                epoch, rec["new_leader"] = st["epoch"], c.ident
                                rec["takeover_s"] = round(time.time() - kill_at, 3)
                                break
                    await asyncio.sleep(0.02)
                if epoch is None:
                    raise RuntimeError("no new leader within 60 s")
                watch = self.watch
                if await watch.wait(lambda: watch.epoch == epoch, 60):
                    rec["route_restamped_s"] = round(time.time() - kill_at, 3)
                rec["_t1"] = time.time()
                rec["panic_classes_seen"] = watch.panic_during(kill_at, rec["_t1"])
            finally:
                await restart
        except Exception as e:
            rec["error"] = repr(e)
        finally:
            self.busy.discard(ident)

    async def restart_coordinator(self, http: aiohttp.ClientSession, c: Coordinator, kill_at: float, rec: dict) -> None:
        await self._restart_later(c.proc, kill_at, rec, lambda: self.fleet.start_coordinator(c.ident))

        async def ready() -> bool:
            async with http.get(c.base + "/readyz") as r:
                return r.status == 200

        await self._until(c.proc, ready, 60, f"coordinator {c.ident} ready after its restart")
        rec["restarted_ready_s"] = round(time.time() - kill_at, 3)

    async def schedule_kills(self, http: aiohttp.ClientSession, t_end: float) -> list[asyncio.Task[None]]:
        """A kill every ``--kill-every`` s until ``t_end`` (victims in turn, every
        ``--kill-leader-every``-th the leader); returns the kills' trackers, still running."""
        tasks: list[asyncio.Task[None]] = []
        n, turn = 0, 0
        while (at := self.t0 + (n + 1) * self.args.kill_every) < t_end:
            await asyncio.sleep(max(0.0, at - time.time()))
            n += 1
            if self.args.kill_leader_every and n % self.args.kill_leader_every == 0:
                tasks.append(asyncio.create_task(self.kill_leader(http)))
                continue
            in_turn = [VICTIMS[(turn + i) % len(VICTIMS)] for i in range(len(VICTIMS))]
            node = next((v for v in in_turn if v not in self.busy), None)  # one not back yet is passed over
            if node is None:
                self.kills.append({"kind": "agent", "skipped": "every victim is still out"})
                continue
            turn = VICTIMS.index(node) + 1
            self.busy.add(node)
            tasks.append(asyncio.create_task(self.kill_agent(http, node)))
        return tasks

    # --- run --------------------------------------------------------------------------------

    async def run(self, out: dict[str, Any]) -> None:
        fleet, args = self.fleet, self.args
        t_start = time.monotonic()
        fleet.start_all()
        entry = fleet.agents[ENTRY]
        async with (
            EtcdClient([fleet.etcd_url], timeout=2.0) as etcd,
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http,
        ):
            async with http.post(
                entry.base + "/admin/instances/m/stop", headers={"Authorization": f"Bearer {TOKEN}"}
            ) as r:
                if r.status != 202:
                    raise RuntimeError(f"stopping the entry's instance: {r.status} {await r.text()}")
            # The first routes come after the leader's grace period (10 s).
            await wait_route(
                etcd, lambda r: serving_ready(r) and ep_state(r, ENTRY) != "READY", 60, "serving A100s READY, entry out"
            )
            out["fleet_start_s"] = round(time.monotonic() - t_start, 1)

            self.watch = RouteWatch(etcd)
            stop, stop_watch = asyncio.Event(), asyncio.Event()
            watcher = asyncio.create_task(self.watch.run(stop_watch))
            self.entry_log_offset = entry.proc.log_path.stat().st_size
            self.t0 = time.time()
            t_end = self.t0 + args.minutes * 60
            background = [
                asyncio.create_task(load(entry.base, args.rate, args.workers, stop, self.plain)),
                asyncio.create_task(stream_load(entry.base, args.stream_rate, stop, self.streams)),
                asyncio.create_task(self.sample_memory(stop)),
            ]
            try:
                kills = await self.schedule_kills(http, t_end)
                await asyncio.sleep(max(0.0, t_end - time.time()))  # the traffic period itself
                out["kill_phase_s"] = round(time.time() - self.t0, 1)
                # Every tracker is bounded by --recovery-timeout (and 60 s takeover + restamp waits).
                await asyncio.gather(*kills)
            finally:
                stop.set()
                await asyncio.gather(*background, return_exceptions=True)
                stop_watch.set()
                await watcher
            out["traffic_s"] = round(time.time() - self.t0, 1)


# --- report --------------------------------------------------------------------------------------


def traffic_summary(samples: list[Sample], t0: float) -> dict[str, Any]:
    if not samples:
        return {"sent": 0}
    ok = sum(s.status == 200 for s in samples)
    failed = sorted((s for s in samples if s.status != 200), key=lambda s: s.start)
    lat = [s.end - s.start for s in samples]
    span = max(s.end for s in samples) - min(s.start for s in samples)
    return {
        "sent": len(samples),
        "ok": ok,
        "failed": len(failed),
        "success_ratio_percent": round(100 * ok / len(samples), 4),
        "achieved_rate_per_s": round(len(samples) / span, 2) if span else None,
        "failures_by_status": {str(k): v for k, v in sorted(Counter(s.status for s in failed).items())},
        "failed_at_s": [round(s.start - t0, 2) for s in failed[:30]],
        "latency_ms": {"p50": ms(pct(lat, 50)), "p99": ms(pct(lat, 99)), "max": ms(max(lat))},
    }


def failed_between(samples: list[Sample], t0: float, t1: float) -> int:
    return sum(1 for s in samples if s.status != 200 and s.end >= t0 and s.start <= t1)


def entry_log_summary(path: Path, offset: int) -> dict[str, Any]:
    """What the entry's proxy saw: its own statuses and the attempts it retried elsewhere."""
    events = log_events(path, offset)
    reqs = [e for e in events if e.get("event") == "request" and e.get("path") == CHAT]
    failed_attempts = [e for e in events if e.get("event") == "upstream attempt failed"]
    return {
        "requests_by_status": {
            kind: dict(Counter(str(e.get("status")) for e in reqs if bool(e.get("stream")) == stream))
            for kind, stream in (("non_streaming", False), ("streaming", True))
        },
        "retried_requests": sum(1 for e in reqs if e.get("retries")),
        "stream_errors": sum(1 for e in reqs if e.get("stream_error")),
        "failed_attempts_by_kind": dict(Counter(e.get("kind") for e in failed_attempts)),
        "warnings_or_errors": dict(Counter(e.get("event") for e in events if e.get("level") in ("warning", "error"))),
    }


def report(soak: Soak, out: dict[str, Any]) -> None:
    for rec in soak.kills:
        t0, t1 = rec.pop("_t0", None), rec.pop("_t1", None)
        if t0 is not None:
            t1 = t1 or (max(s.end for s in soak.plain) if soak.plain else t0)
            rec["failed_in_window"] = {
                "non_streaming": failed_between(soak.plain, t0, t1),
                "streaming": failed_between(soak.streams, t0, t1),
            }
    agent_kills = [k for k in soak.kills if k["kind"] == "agent" and "at_s" in k and "skipped" not in k]
    recov = [k["route_ready_again_s"] for k in agent_kills if k.get("route_ready_again_s") is not None]
    downs = [k["route_down_s"] for k in agent_kills if k.get("route_down_s") is not None]
    takeovers = [k["takeover_s"] for k in soak.kills if "takeover_s" in k]
    out["non_streaming"] = traffic_summary(soak.plain, soak.t0)
    out["streaming"] = traffic_summary(soak.streams, soak.t0)
    out["kills"] = soak.kills
    out["kill_summary"] = {
        "agent_kills": len(agent_kills),
        "leader_kills": len(takeovers),
        "skipped": sum(1 for k in soak.kills if "skipped" in k),
        "not_recovered": [k.get("victim") for k in agent_kills if k.get("route_ready_again_s") is None],
        "mean_recovery_s": round(statistics.fmean(recov), 2) if recov else None,
        "max_recovery_s": max(recov) if recov else None,
        "mean_route_down_s": round(statistics.fmean(downs), 3) if downs else None,
        "mean_takeover_s": round(statistics.fmean(takeovers), 3) if takeovers else None,
    }
    out["memory"] = soak.memory_summary()


def leftover_by_path(tmp: Path) -> list[str]:
    """Any process still running from this run's directory (agents, coordinators, etcd)."""
    left = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and d.name != str(os.getpid()):
            with contextlib.suppress(OSError):
                cmd = (d / "cmdline").read_bytes()
                if str(tmp).encode() in cmd:
                    text = cmd.replace(b"\0", b" ").decode(errors="replace")
                    left.append(f"pid {d.name}: {text[:200]}")
    return left


def interrupt(*_: object) -> None:
    """SIGTERM (a cancelled job) cleans up like Ctrl-C."""
    raise KeyboardInterrupt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="traffic period with kills")
    ap.add_argument("--rate", type=float, default=50.0, help="non-streaming requests/s through the entry agent")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--stream-rate", type=float, default=2.0, help="streaming requests/s")
    ap.add_argument("--kill-every", type=float, default=60.0, help="seconds between kills")
    ap.add_argument("--restart-after", type=float, default=10.0, help="seconds from a kill to the restart")
    ap.add_argument("--kill-leader-every", type=int, default=5, help="every N-th kill is of the leader (0: never)")
    ap.add_argument("--recovery-timeout", type=float, default=360.0, help="give up on a victim after this long")
    ap.add_argument("--sample-every", type=float, default=10.0, help="memory sampling interval, seconds")
    ap.add_argument("--warmup", type=float, default=60.0, help="memory growth is measured from this long in")
    ap.add_argument("--keep-logs", action="store_true", help="keep the temporary directory with every log")
    args = ap.parse_args()
    configure_logging("console", "warning")  # our etcd client's own logs go to stderr, not into the JSON
    signal.signal(signal.SIGTERM, interrupt)
    t0 = time.monotonic()
    out: dict[str, Any] = {
        "benchmark": "soak",
        "cpus": os.cpu_count(),
        "settings": {
            "minutes": args.minutes,
            "non_streaming": f"{args.rate:g} req/s from {args.workers} workers, max_tokens 2",
            "streaming": f"{args.stream_rate:g} streams/s, open loop, max_tokens 2",
            "kill_every_s": args.kill_every,
            "restart_after_s": args.restart_after,
            "kill_leader_every": args.kill_leader_every,
            "victims": VICTIMS,
            "entry": f"{ENTRY} (own instance stopped; forwards by route weight)",
            "agent_lease_ttl_s": 10,
            "coordinator": "lease 15 s, renew deadline 10 s, retry 2 s, grace 10 s, sample every 5 s",
            "memory": f"every {args.sample_every:g} s, growth from {args.warmup:g} s in",
        },
    }
    tmp = Path(tempfile.mkdtemp(prefix="gpufleet-soak-"))
    fleet = Fleet(tmp, sys.executable)
    soak = Soak(fleet, args)
    try:
        asyncio.run(soak.run(out))
    except (Exception, KeyboardInterrupt) as e:
        out["aborted"] = repr(e)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)  # the cleanup itself must not be interrupted
        out["leftover_model_servers_killed_at_end"] = fleet.stop_all()
        out["leftover_processes_from_run_dir"] = leftover_by_path(tmp)
        if ENTRY in fleet.agents and soak.t0:
            with contextlib.suppress(OSError):
                out["entry_proxy_log"] = entry_log_summary(fleet.agents[ENTRY].proc.log_path, soak.entry_log_offset)
        if args.keep_logs:
            out["logs"] = str(tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    report(soak, out)
    out["reference"] = {
        "article_001_availability_percent": ARTICLE_001_AVAILABILITY_PERCENT,
        "article_001_mean_recovery_s": ARTICLE_001_MEAN_RECOVERY_S,
        "note": "article 001's recovery is from a GPU failure to traffic flowing elsewhere; here traffic flows on "
        "through a kill (retry before the first byte), and recovery is until the killed node serves again, "
        "which includes the restart and the leader's readmission hold",
    }
    out["total_runtime_s"] = round(time.monotonic() - t0, 1)
    print(json.dumps(out, indent=2))
    if "aborted" in out:
        sys.exit(1)


if __name__ == "__main__":
    main()
