#!/usr/bin/env python3
"""One process of route watchers for bench/scale.py: ``--count`` agents' route mirrors, as on
separate hosts.

Each watcher is the agent's real ``RouteTable`` on its own ``EtcdClient`` (its own connections),
imported from ``--code`` (a source tree: the current one, or an older commit's for the old
single-value layout). With ``--pinned`` the table follows the model's slices as an agent that
serves it does (the sliced layout's ``pinned`` argument; the old table has none).

Protocol (JSON lines; commands on stdin, events on stdout; times are ``time.monotonic()``,
which is the same clock in every process on the host):

    -> {"event": "started", "rss_kb": ..., "routes_module": ...}   imports done, before any watcher
    -> {"event": "synced", "t": ...}        every watcher has the model with ``--endpoints`` endpoints
    <- {"cmd": "watch", "id": 1, "node": "sim-0007", "capped": true, "threshold": 66, "timeout": 30}
    -> {"event": "seen", "id": 1, "times": [...], "missing": 0}
         for each watcher that follows ``node``'s slice (every one, unless it follows a subset of
         the slices), when it first saw every endpoint of ``node`` at weight <= threshold
         (``capped``) or all > threshold (not ``capped``); ``missing``: those that had not by
         ``timeout``
    <- {"cmd": "stop"} (or end of input): stop the tables, close the clients, exit

Nothing is polled outside a ``watch`` (so the process's CPU in steady state is the mirrors'),
and a ``watch`` on tables that report their route changes (``on_route``) polls nothing either.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

POLL_S = 0.005  # how often a pending watch looks at the tables (only while one is pending)
SYNC_POLL_S = 0.2


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def emit(**event: Any) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def follows(table: Any, model: str, node: str) -> bool:
    """Whether ``table`` follows the slice that lists ``node`` (every table follows every slice
    unless it follows a subset)."""
    if not hasattr(table, "window") or table.window(model) is None:
        return True
    return bool(node_weights(table, model, node))


def node_weights(table: Any, model: str, node: str) -> list[int]:
    route = table.routes.get(model)
    return [e.weight for e in route.endpoints if e.node == node] if route is not None else []


async def wait_synced(tables: list[Any], model: str, endpoints: int) -> None:
    def synced(t: Any) -> bool:
        r = t.routes.get(model)
        if r is None:
            return False
        if hasattr(t, "window") and t.window(model) is not None:  # a subset: the header counts them all
            return t.headers[model].ready_endpoints == endpoints
        return len(r.endpoints) == endpoints

    while not all(synced(t) for t in tables):  # noqa: ASYNC110 - a benchmark's poll
        await asyncio.sleep(SYNC_POLL_S)
    emit(event="synced", t=time.monotonic())


async def watch(tables: list[Any], model: str, cmd: dict[str, Any]) -> None:
    """Report when each table first shows ``cmd["node"]`` capped (or uncapped)."""
    node, capped, threshold = cmd["node"], cmd["capped"], cmd["threshold"]

    def holds(weights: list[int]) -> bool:
        if not weights:
            return False
        return max(weights) <= threshold if capped else min(weights) > threshold

    tables = [t for t in tables if follows(t, model, node)]
    seen: dict[int, float] = {}
    last: dict[int, object] = {}
    deadline = time.monotonic() + cmd["timeout"]
    if all(hasattr(t, "on_route") for t in tables):  # told of each route change: no polling
        await _watch_events(tables, model, node, holds, seen, deadline)
        emit(event="seen", id=cmd["id"], times=sorted(seen.values()), missing=len(tables) - len(seen))
        return
    while len(seen) < len(tables) and time.monotonic() < deadline:
        now = time.monotonic()
        for i, t in enumerate(tables):
            route = t.routes.get(model)
            if i in seen or route is last.get(i):  # a route object is replaced on every change
                continue
            last[i] = route
            if holds(node_weights(t, model, node)):
                seen[i] = now
        await asyncio.sleep(POLL_S)
    emit(event="seen", id=cmd["id"], times=sorted(seen.values()), missing=len(tables) - len(seen))


async def _watch_events(
    tables: list[Any], model: str, node: str, holds: Any, seen: dict[int, float], deadline: float
) -> None:
    """The same watch through ``RouteTable.on_route`` (the sliced layout's tables): each table
    is looked at when its route changes, so a pending trial costs the process no CPU of its own."""
    done = asyncio.Event()

    def check(i: int, t: Any) -> None:
        if i not in seen and holds(node_weights(t, model, node)):
            seen[i] = time.monotonic()
            if len(seen) == len(tables):
                done.set()

    for i, t in enumerate(tables):
        t.on_route = lambda m, i=i, t=t: check(i, t) if m == model else None
        check(i, t)
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await done.wait()
    finally:
        for t in tables:
            t.on_route = None


async def commands() -> asyncio.StreamReader:
    reader = asyncio.StreamReader(limit=1 << 20)
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def main(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(args.code).resolve()))
    from agent.cluster import routes as routes_module
    from gpufleet.etcd import EtcdClient
    from gpufleet.keyspace import Keyspace
    from gpufleet.logsetup import configure_logging

    configure_logging("console", "error")
    emit(event="started", rss_kb=rss_kb(), routes_module=routes_module.__file__)
    keys = Keyspace(args.cluster)
    clients = [EtcdClient([args.url], timeout=10.0) for _ in range(args.count)]
    tables = []
    settings = routes_module.WatchSettings(route_subset_slices=args.subset) if args.pinned else None
    extra = {"pinned": lambda: {args.model}, "settings": lambda: settings} if args.pinned else {}
    for i, c in enumerate(clients):
        await c.__aenter__()
        t = routes_module.RouteTable(c, keys, f"{args.name}-{i:03d}", **extra)
        t.start()
        tables.append(t)
    syncing = asyncio.create_task(wait_synced(tables, args.model, args.endpoints))
    reader = await commands()
    watches: set[asyncio.Task[None]] = set()
    try:
        while line := await reader.readline():
            cmd = json.loads(line)
            if cmd["cmd"] == "stop":
                break
            if cmd["cmd"] == "watch":
                task = asyncio.create_task(watch(tables, args.model, cmd))
                watches.add(task)
                task.add_done_callback(watches.discard)
    finally:
        for task in [syncing, *watches]:
            task.cancel()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await asyncio.gather(*(t.stop() for t in tables), return_exceptions=True)
                await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="etcd client URL")
    ap.add_argument("--cluster", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--endpoints", type=int, required=True, help="the model's endpoint count once synced")
    ap.add_argument("--count", type=int, default=100, help="watchers in this process")
    ap.add_argument("--name", default="w", help="prefix of the watchers' node ids")
    ap.add_argument("--code", default=str(Path(__file__).resolve().parent.parent), help="source tree to import")
    ap.add_argument("--pinned", action="store_true", help="follow the model's slices (sliced layout)")
    ap.add_argument("--subset", type=int, default=0, help="route_subset_slices (sliced layout; 0: every slice)")
    asyncio.run(main(ap.parse_args()))
