#!/usr/bin/env python3
"""What the proxy's features cost when written flat: a bare relay, then the same relay with the
data path's per-request work added one feature at a time, each level measured as
bench/proxy_inproc.py measures the agent's proxy (one process, one core, CPU per request
through the relay less that of a direct request, as a multiple of a direct request).

The levels add, in order: the request head's fields (URL, headers, keep-alive), the body's
``model`` parsed, the upstream request's head rebuilt (hop-by-hop headers dropped, a request
id and X-Forwarded-For set), an instance picked by least in-flight under a concurrency gate,
the attempt's deadline on the shared Deadlines, the answer's head rebuilt (the upstream's
header lines less hop-by-hop ones, ours and Date added), the metrics and the access-log line
(noted per request and done in batches, as the proxy does), and the connection's idle timer and
idle list. Each is the least a relay with that feature
does per request, in plain Python on the library's own pieces (gpufleet/deadlines.py, the
proxy's metrics and access log): the gap between the last level and the agent's proxy is what
its structure costs (objects per request, layers, the paths it keeps for what must wait).

It relays only the common case (a whole JSON request, a whole answer): it is a measure, not a
proxy. ``serve`` runs one level as a server, bench/proxy.py's ``floor`` target: what a relay
with these features written flat does in the peers' harness, next to them (the ceiling a Python
proxy on this machine can reach with them).

    .venv/bin/python bench/proxy_floor.py [--levels 0,8] [--seconds 2] [--blocks 5] [--directions]
    .venv/bin/python bench/proxy_floor.py serve [--level 10] PORT=http://HOST:PORT ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import httptools
import msgspec
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import proxy_inproc as harness
from _common import Directions

from agent.config import ProxySection
from agent.proxy.accesslog import AccessEntry, AccessLog
from agent.proxy.context import REQUEST_ID_HEADER, Ctx, Head, new_request_id
from agent.proxy.metrics import _Requests
from agent.proxy.stats import ProxyStats
from gpufleet.deadlines import Deadlines, Timed
from gpufleet.facts import INSTANCE_HEADER, NODE_HEADER
from gpufleet.httpserver import ApiSection, ConnectionGuard
from gpufleet.logsetup import configure_logging
from gpufleet.outbox import Outbox

LEVELS = (
    "bare relay",
    "+ request head's fields",
    "+ body's model parsed",
    "+ upstream head rebuilt",
    "+ instance picked under a gate",
    "+ attempt deadline",
    "+ answer head rebuilt",
    "+ metrics and access log",
    "+ connection idle timer",
    "+ writes held to the end of the turn",
    "+ the agent's other per-request steps, as they pass in the common case",
)
HOP_BY_HOP = frozenset(
    n.encode()
    for n in (
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "host",
        REQUEST_ID_HEADER.lower(),
        "x-forwarded-for",
    )
)
ANSWER_SKIP = frozenset(n.encode() for n in ("connection", "keep-alive", "transfer-encoding", "content-length", "date"))
OURS = b"%s: %%s\r\nX-Forwarded-For: %%s\r\n" % REQUEST_ID_HEADER.encode()
decode_head = msgspec.json.Decoder(Head).decode


class Relay:
    """The shared state: the level, the instances' pools and counts, the gate, the timers."""

    def __init__(self, level: int, base_urls: list[tuple[str, int]]) -> None:
        self.level = level
        self.addresses = {f"i{n}": address for n, address in enumerate(base_urls)}
        self.pools: dict[str, list[Up]] = {name: [] for name in self.addresses}
        self.in_flight = dict.fromkeys(self.pools, 0)
        self.gate_free = 1024
        self.deadlines = Deadlines()
        self.metrics = _Requests()
        self.access = AccessLog()
        self.idle: OrderedDict[Front, float] = OrderedDict()
        self.outbox = Outbox()
        # Level 10: the agent's own pieces for the steps it takes per request. In the common
        # case (standalone, no keys, no degradation, no limits) they are looked at and pass.
        self.cfg = ProxySection()
        self.stats = ProxyStats()
        self.guard = ConnectionGuard(ApiSection(), 1_000_000)
        self.instances = {name: harness.Instance(f"http://{h}:{p}") for name, (h, p) in self.addresses.items()}
        self.served = {
            name: b"%s: bench\r\n%s: %s\r\n" % (NODE_HEADER.encode(), INSTANCE_HEADER.encode(), name.encode())
            for name in self.pools
        }
        self.routes = self.cold_start = self.key_gate = None
        self.degrade_level = 0
        self.in_flight_by_model: dict[str, int] = {}

    def send(self, name: str, front: Front, data: bytes) -> None:
        """``data`` to instance ``name`` on a pooled connection, or (serve mode: a pool ran dry,
        a backend closed its idle connections) on a new one."""
        pool = self.pools[name]
        if pool:
            up = pool.pop()
            up.front = front
            up.send(data)
            return

        async def connect() -> None:
            host, port = self.addresses[name]
            try:
                _, up = await asyncio.get_running_loop().create_connection(lambda: Up(self, name), host, port)
            except OSError:
                front.transport.close()
                return
            up.front = front
            up.send(data)

        asyncio.get_running_loop().create_task(connect())


class Writer:
    """A connection's writes: at once, or (level 9) held to the end of the turn."""

    relay: Relay
    transport: asyncio.Transport
    held: list[bytes]

    def send(self, data: bytes) -> None:
        if self.relay.level < 9:
            self.transport.write(data)
            return
        if not self.held:
            self.relay.outbox.hold(self)
        self.held.append(data)

    def write_held(self) -> None:
        held, self.held = self.held, []
        if not self.transport.is_closing():
            self.transport.writelines(held)


class Up(Writer, asyncio.Protocol):
    def __init__(self, relay: Relay, name: str) -> None:
        self.relay, self.name = relay, name
        self.held = []
        self.parser = httptools.HttpResponseParser(self)
        self.raw: list[bytes] = []
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.front: Front | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        pool = self.relay.pools[self.name]
        if self in pool:
            pool.remove(self)
        if self.front is not None:  # its answer will not come: the client's connection closes
            self.front.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.relay.level < 6:
            self.raw.append(data)
        self.parser.feed_data(data)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.relay.level >= 6:
            self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        if self.relay.level >= 6:
            self.body.append(body)

    def on_message_complete(self) -> None:
        front, self.front = self.front, None
        assert front is not None
        relay = self.relay
        relay.pools[self.name].append(self)
        if relay.level < 6:
            data = b"".join(self.raw)
            self.raw = []
            front.answered(self, data)
            return
        status = self.parser.get_status_code()
        passed = [n + b": " + v + b"\r\n" for n, v in self.headers if n.lower() not in ANSWER_SKIP]
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        self.headers, self.body = [], []
        if relay.level >= 10:
            ours = relay.served[self.name] + b"%s: %s\r\n" % (REQUEST_ID_HEADER.encode(), front.rid.encode())
        else:
            ours = b"X-Gpufleet-Instance: %s\r\n" % self.name.encode()
        head = b"HTTP/1.1 %d OK\r\n%s%sContent-Length: %d\r\n%s\r\n" % (
            status,
            b"".join(passed),
            ours,
            len(body),
            front.date(),
        )
        front.answered(self, head + body, status)


class Limit(Timed):
    """An attempt's deadline, or a connection's idle limit: filed and moved as the proxy's are
    (the relay measures their filing; what they would do when due is not measured)."""

    __slots__ = ("front",)

    def __init__(self, front: Front, when: float) -> None:
        super().__init__(when)
        self.front = front

    def fire(self, now: float) -> float | None:
        return None if self._when <= now else self._when


class Front(Writer, asyncio.Protocol):
    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.held = []
        self.parser = httptools.HttpRequestParser(self)
        self.raw: list[bytes] = []
        self.body: list[bytes] = []
        self.headers: list[tuple[bytes, bytes]] = []
        self.url = b""
        self.keep_alive = True
        self.rid = ""
        self.model = ""
        self.started = 0.0
        self.attempt: Limit | None = None
        self.timer: Limit | None = None
        self.ctx: Ctx | None = None  # level 10
        self._second, self._date = -1, b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.idle.pop(self, None)
        for limit in (self.attempt, self.timer):
            if limit is not None:
                self.relay.deadlines.remove(limit)

    def data_received(self, data: bytes) -> None:
        if self.relay.level < 1:
            self.raw.append(data)
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        relay = self.relay
        level = relay.level
        if level < 1:
            data = b"".join(self.raw)
            self.raw, self.body = [], []
            relay.send("i0", self, data)
            return
        self.started = time.monotonic()
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        headers, url = self.headers, self.url
        self.body, self.headers, self.url = [], [], b""
        if level >= 2:
            self.model = decode_head(body).model
        name = "i0"
        if level >= 4:
            relay.gate_free -= 1
            in_flight = relay.in_flight
            name = min(in_flight, key=in_flight.__getitem__)
            in_flight[name] += 1
        if level >= 3:
            rid = b""
            passed = []
            for n, v in headers:
                low = n.lower()
                if low == b"x-request-id":
                    rid = v
                elif low not in HOP_BY_HOP:
                    passed.append(n + b": " + v + b"\r\n")
            self.rid = rid.decode() if rid else new_request_id()
            passed.append(OURS % (self.rid.encode(), b"127.0.0.1"))
            lines = b"".join(passed)
        else:
            kept = [n + b": " + v + b"\r\n" for n, v in headers if n.lower() not in (b"host", b"content-length")]
            lines = b"".join(kept)
        if level >= 10:
            name = self.steps(relay, headers, name)
        head = b"POST %s HTTP/1.1\r\nHost: backend\r\nContent-Length: %d\r\n%s\r\n" % (url, len(body), lines)
        relay.send(name, self, head + body)
        if level >= 5:
            deadlines = relay.deadlines
            self.attempt = attempt = Limit(self, deadlines.now() + 60.0)
            deadlines.add(attempt)
        if level >= 8:
            relay.idle.pop(self, None)

    def steps(self, relay: Relay, headers: list[tuple[bytes, bytes]], name: str) -> str:
        """Level 10: what the agent does per request beyond the levels below, each as the agent
        does it on its own objects, and as it passes in the common case; the instance to use."""
        relay.guard.busy(self)  # type: ignore[arg-type]
        cfg = relay.cfg
        ctx = self.ctx = Ctx(self.rid, self.started, cfg, relay.deadlines.now())
        ctx.model, ctx.stream = self.model, False
        forwarded = any(n.lower() == b"x-gpufleet-hops" for n, _ in headers)
        if relay.key_gate is not None or relay.routes is not None or relay.cold_start is not None:
            raise RuntimeError("the floor relays the common case only")
        if not forwarded and relay.degrade_level != 0:
            raise RuntimeError("the floor relays the common case only")
        relay.stats.counters.requests += 1
        ctx.model_label = self.model
        if cfg.limits.get(self.model) is not None or cfg.affinity_header or cfg.task_routes:
            raise RuntimeError("the floor relays the common case only")
        by_model = relay.in_flight_by_model
        by_model[self.model] = by_model.get(self.model, 0) + 1
        stats = relay.stats
        ready = [i for n, i in relay.instances.items() if n == name and i.routable(stats.in_flight(n))]
        if not ready:
            raise RuntimeError("the floor's instance is always ready")
        upstream = stats.upstream(name)
        upstream.in_flight += 1
        upstream.requests += 1
        stats.counters.attempts += 1
        ctx.instance = name
        ready[0].watch(self.gone)
        return name

    def gone(self) -> None:
        """Level 10: the instance left rotation (never, here)."""

    def answered(self, up: Up, data: bytes, status: int = 200) -> None:
        relay = self.relay
        level = relay.level
        if level >= 10:
            ctx = self.ctx
            assert ctx is not None
            instance = relay.instances[up.name]
            instance.unwatch(self.gone)
            relay.stats.upstream(up.name).in_flight -= 1
            if status >= 400:
                raise RuntimeError("the floor relays successes only")
            ctx.ttfb = time.monotonic() - ctx.started
            instance.report_success()
            ctx.status = status
            relay.in_flight_by_model[self.model] -= 1
            relay.guard.waiting(self)  # type: ignore[arg-type]
        if level >= 5 and self.attempt is not None:
            relay.deadlines.remove(self.attempt)
            self.attempt = None
        if level >= 4:
            relay.in_flight[up.name] -= 1
            relay.gate_free += 1
        self.send(data)
        if level >= 7:
            duration = time.monotonic() - self.started
            relay.metrics.note(self.model, status, duration, duration)
            relay.access.write(
                AccessEntry(
                    self.rid, "POST", "/v1/chat/completions", self.model, up.name, status, False, duration, duration, 0
                )
            )
        if level >= 8:
            deadlines = relay.deadlines
            when = deadlines.now() + 75.0
            relay.idle[self] = time.monotonic()
            if self.timer is None:
                self.timer = Limit(self, when)
            deadlines.move(self.timer, when)

    def date(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._date = b"Date: " + time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)).encode() + b"\r\n"
        return self._date


async def measure(level: int, args: argparse.Namespace) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    backends = [await loop.create_server(harness.Backend, "127.0.0.1", 0) for _ in range(2)]
    ports = [("127.0.0.1", b.sockets[0].getsockname()[1]) for b in backends]
    relay = Relay(level, ports)
    for n, (host, port) in enumerate(ports):
        for _ in range(args.clients + 8):
            _, up = await loop.create_connection(lambda n=n: Up(relay, f"i{n}"), host, port)
            relay.pools[f"i{n}"].append(up)
    front = await loop.create_server(lambda: Front(relay), "127.0.0.1", 0, backlog=4096)
    pport = front.sockets[0].getsockname()[1]
    bport = ports[0][1]
    await harness.block(pport, args.clients, min(0.5, args.seconds), False)  # warm-up: pools, caches
    direct, proxied = [], []
    for _ in range(args.blocks):
        n, cpu, _ = await harness.block(bport, args.clients, args.seconds, False)
        direct.append(cpu / n)
        n, cpu, _ = await harness.block(pport, args.clients, args.seconds, False)
        proxied.append(cpu / n)
    relay.access.flush()
    front.close()
    for b in backends:
        b.close()
    per_request = statistics.median([p - d for p, d in zip(proxied, direct, strict=True)])
    return {
        "level": level,
        "what": LEVELS[level],
        "relay_us_per_request": round(1e6 * per_request, 1),
        "direct_us_per_request": round(1e6 * statistics.median(direct), 1),
        "relay_cost_in_direct_requests": round(per_request / statistics.median(direct), 2),
    }


async def serve(level: int, routes: list[str]) -> None:
    """The relay at ``level`` as a server, for bench/proxy.py's ``floor`` target: each route
    ``PORT=http://HOST:PORT`` listens on 127.0.0.1:PORT and relays to that backend."""
    loop = asyncio.get_running_loop()
    for route in routes:
        port, _, url = route.partition("=")
        host, _, backend_port = url.removeprefix("http://").partition(":")
        relay = Relay(level, [(host, int(backend_port))])
        await loop.create_server(lambda relay=relay: Front(relay), "127.0.0.1", int(port), backlog=4096)
    await asyncio.Event().wait()


def main() -> None:
    if sys.argv[1:2] == ["serve"]:
        sp = argparse.ArgumentParser(prog="proxy_floor.py serve", description=serve.__doc__)
        sp.add_argument("--level", type=int, default=len(LEVELS) - 1)
        sp.add_argument("routes", nargs="+", metavar="PORT=http://HOST:PORT")
        sargs = sp.parse_args(sys.argv[2:])
        configure_logging("json", "info")  # the access log to stderr, as the agent's (bench/proxy.py keeps it)
        uvloop.run(serve(sargs.level, sargs.routes))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--levels", default=f"0,{len(LEVELS) - 1}", help="first,last level (inclusive)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--cpu", type=int, default=0)
    ap.add_argument("--directions", action="store_true", help="time each side's data_received (_common.Directions)")
    args = ap.parse_args()
    directions = Directions(client=Front, upstream=Up) if args.directions else None
    first, last = (int(x) for x in args.levels.split(","))
    os.sched_setaffinity(0, {args.cpu})
    log = tempfile.NamedTemporaryFile(prefix="proxy-floor-log-")
    saved = os.dup(2)
    os.dup2(log.fileno(), 2)  # JSON logs to a file, as in production (the access log's writes)
    configure_logging("json", "info")
    results = [uvloop.run(measure(level, args)) for level in range(first, last + 1)]
    os.dup2(saved, 2)
    if directions is not None:  # over all the levels run
        results[-1]["us_per_call_in_data_received"] = directions.report()
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
