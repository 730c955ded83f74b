#!/usr/bin/env python3
"""The proxy's CPU per request, in one process: a steadier measure than bench/proxy.py's for
comparing two versions of the data path.

Client, proxy and backend run on one uvloop loop in this process (pinned to one core): the
agent's front protocol (agent/proxy/front.py) and a real ``Proxy`` over one local instance, a
canned backend (an asyncio Protocol answering every POST with one fixed chat completion), and
``--clients`` keep-alive clients, each sending its next request when its answer is complete.
Blocks alternate between the clients talking to the backend directly and through the proxy;
the proxy's cost per request is the process CPU time (user + system: both ends of every loopback
write are in this process) per request through the proxy minus that of a direct request (the
client's and backend's share). Logging is configured as in production (JSON, to a file, the
access log on), metrics on. With separate processes on two cores (bench/proxy_profile.py) the
figure moves ±15 % between runs on this VM; here both halves of each comparison share the
process and the moment.

    .venv/bin/python bench/proxy_inproc.py [--clients 32] [--seconds 2] [--blocks 5] [--stream] [--directions]
        [--route-nodes N [--forward [--dead-nodes K]]] [--affinity]
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
from collections.abc import Callable
from pathlib import Path

import httptools
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import Directions
from prometheus_client import CollectorRegistry

from agent.backends import Judgement, Upstream, judge_status
from agent.config import AuthSection, DegradationSection, ProxySection
from agent.keys.gate import KeyGate
from agent.proxy import Proxy
from agent.proxy.front import Front, FrontProtocol
from agent.proxy.httpclient import _Connection
from agent.proxy.metrics import ProxyMetrics
from agent.proxy.upstreams import LocalUpstream, ServedModel
from agent.supervisor.supervision_policy import InstanceState
from gpufleet.httpserver import ApiSection, ConnectionGuard
from gpufleet.keyspace.records import RouteEndpoint, RouteRecord
from gpufleet.logsetup import configure_logging
from gpufleet.tasks import Flag

MODEL = "canned"
AFFINITY_HEADER = "X-Session-ID"  # --affinity: [proxy] affinity_header, sent with every request
ANSWER = json.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }
).encode()
EVENT = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'


class Backend(asyncio.Protocol):
    """Answers each request as soon as it is complete: a fixed JSON body, or (``stream`` in the
    body) an SSE stream of ``EVENTS`` events in one write."""

    EVENTS = 4

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.body = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        if b'"stream": true' in self.body or b'"stream":true' in self.body:
            chunks = b"".join(b"%x\r\n%s\r\n" % (len(EVENT), EVENT) for _ in range(self.EVENTS))
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                + chunks
                + b"0\r\n\r\n"
            )
        else:
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(ANSWER), ANSWER)
            )
        self.body = b""


class Client(asyncio.Protocol):
    """One keep-alive connection sending ``request`` again each time an answer is complete."""

    def __init__(self, request: bytes, done: Callable[[], bool]) -> None:
        self.request = request
        self.done = done
        self.parser = httptools.HttpResponseParser(self)
        self.answers = 0
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        if self.parser.get_status_code() != 200:
            raise SystemExit(f"answer {self.parser.get_status_code()}")
        self.answers += 1
        if self.done():
            self.transport.close()
            if not self.finished.done():
                self.finished.set_result(None)
        else:
            self.transport.write(self.request)


class Instance:
    """A READY local instance (the supervisor's ``Instance`` as the proxy sees it)."""

    def __init__(self, base_url: str) -> None:
        self.name, self.model = "canned-0", MODEL
        self.upstream = Upstream(base_url)
        self.base_url = base_url
        self.state = InstanceState.READY
        self._watchers: list[Callable[[], None]] = []

    def routable(self, in_flight: int, *, suspect_ok: bool = False) -> bool:
        return self.state is InstanceState.READY

    def judge(self, status: int, body: bytes) -> Judgement:
        return Judgement(judge_status(status))

    def watch(self, on_leave: Callable[[], None]) -> None:
        self._watchers.append(on_leave)

    def unwatch(self, on_leave: Callable[[], None]) -> None:
        self._watchers.remove(on_leave)

    def request_probe(self) -> None:
        pass

    def report_success(self) -> None:
        pass

    def report_failure(self, detail: str, answered: bool = False) -> bool:
        return False


class Routes:
    """The cluster's route table as the proxy reads it (agent/proxy/upstreams.py's RouteView),
    with one followed route: ``MODEL`` on this node and on ``others`` other nodes, all READY
    and of this node's GPU class, as a model served across a fleet is. ``forward_to``: the other
    nodes' address (the canned backend stands in for their agents); else unreachable ones,
    never used while this node serves the model itself."""

    def __init__(self, others: int, forward_to: str | None = None, dead: int = 0) -> None:
        def where(n: int) -> str:
            if n < dead:  # listed READY, but refuses connections (a node that just died)
                return "http://127.0.0.1:1"
            return forward_to or f"http://10.0.{n // 250}.{n % 250 + 1}:8080"

        nodes = [("bench", "http://127.0.0.1:1")] + [(f"node-{n:04d}", where(n)) for n in range(others)]
        endpoints = [
            RouteEndpoint(node=node, address=address, instance=f"{node}-0", gpu_class="A100", weight=100, state="READY")
            for node, address in nodes
        ]
        route = RouteRecord(model=MODEL, epoch=1, updated_at=0.0, endpoints=endpoints)
        self.routes = self.headers = {MODEL: route}
        self.drained = False
        self.degradation = None
        self.degradation_seen_at = 0.0
        self._gone: dict[str, Flag] = {}

    def route(self, model: str) -> RouteRecord | None:
        return self.routes.get(model)

    async def want(self, model: str) -> None:
        pass

    def want_now(self, model: str) -> bool:
        return True

    def node_gone(self, node: str) -> Flag:
        flag = self._gone.get(node)  # as RouteTable's: one Flag per node, not one per call
        if flag is None:
            flag = self._gone[node] = Flag()
        return flag


class Node:
    """The agent as the proxy sees it (agent/proxy/upstreams.py): one instance, standalone, or
    in a cluster whose route lists ``other_nodes`` more. Its config and routes are read through
    getters, as the agent's adapter reads them (a reload replaces the config): the proxy pays for
    those reads here as it does in the agent."""

    def __init__(
        self,
        instance: Instance,
        other_nodes: int | None = None,
        forward: bool = False,
        affinity: bool = False,
        dead: int = 0,
    ) -> None:
        self.instances = [] if forward else [instance]
        self.node_id = "bench"
        proxy, degradation = ProxySection(affinity_header=AFFINITY_HEADER if affinity else ""), DegradationSection()
        self._cfg = lambda: (proxy, degradation)
        routes = Routes(other_nodes, instance.base_url if forward else None, dead) if other_nodes is not None else None
        self._routes = lambda: routes

    @property
    def proxy_cfg(self) -> ProxySection:
        return self._cfg()[0]

    @property
    def degradation_cfg(self) -> DegradationSection:
        return self._cfg()[1]

    @property
    def routes(self) -> Routes | None:
        return self._routes()

    def local(self, model: str) -> list[LocalUpstream]:
        return [i for i in self.instances if i.model == model]  # type: ignore[misc]

    def ready_models(self) -> list[ServedModel]:
        return [ServedModel(MODEL, 0.0, MODEL)]

    def gpu_classes(self) -> set[str]:
        return {"A100"}

    def fallback_of(self, model: str) -> str | None:
        return None


def request(port: int, stream: bool, extra: bytes = b"") -> bytes:
    body = json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 1, "stream": stream}
    ).encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
        b"Accept: */*\r\n%sContent-Length: %d\r\n\r\n%s" % (port, extra, len(body), body)
    )


async def block(port: int, clients: int, seconds: float, stream: bool, extra: bytes = b"") -> tuple[int, float, float]:
    """Requests answered, CPU seconds and wall seconds of ``clients`` clients for ``seconds``."""
    loop = asyncio.get_running_loop()
    end = time.monotonic() + seconds
    raw = request(port, stream, extra)
    cpu0, t0 = time.process_time(), time.monotonic()
    conns = [
        (await loop.create_connection(lambda: Client(raw, lambda: time.monotonic() >= end), "127.0.0.1", port))[1]
        for _ in range(clients)
    ]
    await asyncio.gather(*(c.finished for c in conns))
    return sum(c.answers for c in conns), time.process_time() - cpu0, time.monotonic() - t0


async def run(args: argparse.Namespace) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    backend = await loop.create_server(Backend, "127.0.0.1", 0)
    bport = backend.sockets[0].getsockname()[1]
    registry = CollectorRegistry()
    # The key gate, as the agent always has one (open mode here: no [auth] keys, a loopback listener).
    auth = AuthSection()  # one object until a reload, as the agent's config holds it
    gate = KeyGate(lambda: auth, "127.0.0.1", "bench", lambda: None, lambda: 1, registry)
    if args.forward and not args.route_nodes:
        raise SystemExit("--forward needs --route-nodes 1 or more")
    node = Node(Instance(f"http://127.0.0.1:{bport}"), args.route_nodes, args.forward, args.affinity, args.dead_nodes)
    proxy = Proxy(node, ProxyMetrics(registry), key_gate=gate)  # type: ignore[arg-type]
    await proxy.start()

    def no_handover() -> asyncio.Protocol:
        raise RuntimeError("the benchmark sends only data-path requests")

    front = await loop.create_server(
        Front(proxy, ConnectionGuard(ApiSection(), 1_000_000), no_handover), "127.0.0.1", 0, backlog=4096
    )
    pport = front.sockets[0].getsockname()[1]
    extra = b"%s: bench-session\r\n" % AFFINITY_HEADER.encode() if args.affinity else b""
    await block(pport, args.clients, 0.5, args.stream, extra)  # warm-up: pools, caches
    direct, proxied, rates = [], [], []
    for _ in range(args.blocks):
        n, cpu, _ = await block(bport, args.clients, args.seconds, args.stream, extra)
        direct.append(cpu / n)
        n, cpu, wall = await block(pport, args.clients, args.seconds, args.stream, extra)
        proxied.append(cpu / n)
        rates.append(n / wall)
    await proxy.close()
    front.close()
    backend.close()
    per_request = [p - d for p, d in zip(proxied, direct, strict=True)]
    return {
        "stream": args.stream,
        "clients": args.clients,
        "proxy_us_per_request": round(1e6 * statistics.median(per_request), 1),
        "proxy_us_per_request_blocks": [round(1e6 * x, 1) for x in per_request],
        "direct_us_per_request": round(1e6 * statistics.median(direct), 1),
        # The VM's speed drifts by ±15 % between runs and moves both alike: this ratio does not.
        "proxy_cost_in_direct_requests": round(statistics.median(per_request) / statistics.median(direct), 2),
        "req_per_s_through_proxy": round(statistics.median(rates)),
        # Which build of the data path ran (bench/proxy_compiled.py runs this on a compiled copy).
        "route_nodes": args.route_nodes,
        "forward": args.forward,
        "affinity": args.affinity,
        "dead_nodes": args.dead_nodes,
        "compiled": not str(sys.modules[Front.__module__].__file__).endswith(".py"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--stream", action="store_true", help="SSE answers (4 events) instead of JSON")
    ap.add_argument("--cpu", type=int, default=0, help="the core to pin this process to")
    ap.add_argument("--profile", type=Path, help="write a cProfile of the whole run here")
    ap.add_argument(
        "--route-nodes", type=int, help="cluster mode: the model's route also lists this many other nodes (0 and up)"
    )
    ap.add_argument(
        "--forward", action="store_true", help="with --route-nodes: no local instance, each request forwarded"
    )
    ap.add_argument(
        "--affinity", action="store_true", help=f"[proxy] affinity_header: each request has {AFFINITY_HEADER}"
    )
    ap.add_argument("--dead-nodes", type=int, default=0, help="with --forward: this many of them refuse connections")
    ap.add_argument("--directions", action="store_true", help="time each side's data_received (_common.Directions)")
    args = ap.parse_args()
    directions = Directions(client=FrontProtocol, upstream=_Connection) if args.directions else None
    os.sched_setaffinity(0, {args.cpu})
    with tempfile.NamedTemporaryFile(prefix="proxy-inproc-", suffix=".log") as log:
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)  # the access log and any other line: as in production, to a file
        try:
            configure_logging("json", "info")
            if args.profile:
                import cProfile

                with cProfile.Profile() as prof:
                    result = uvloop.run(run(args))
                prof.dump_stats(args.profile)
            else:
                result = uvloop.run(run(args))
        finally:
            os.dup2(saved, 2)
        result["log_lines"] = sum(1 for _ in open(log.name, "rb"))
    if directions is not None:
        result["us_per_call_in_data_received"] = directions.report()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
