"""The proxy's error paths in process: pytest-aiohttp's ``aiohttp_client`` in front of a real
``Proxy`` over a fake ``Upstreams`` (agent/proxy/upstreams.py), with real aiohttp apps standing
in for model servers and for another node. Fast (no agent process, no simulated server); the
process tests (test_proxy.py, test_remote_routing.py, faults/) cover the same paths end to end
with the supervisor's passive health in the loop."""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry, generate_latest

from agent.backends import Judgement, Upstream, judge_status
from agent.config import DegradationSection, ProxySection
from agent.proxy import Proxy, add_proxy
from agent.proxy.metrics import ProxyMetrics
from agent.proxy.upstreams import LocalUpstream, ServedModel
from agent.supervisor.supervision_policy import InstanceState
from gpufleet.facts import HOPS_HEADER, INSTANCE_HEADER, NODE_HEADER, REQUEST_ID_HEADER
from gpufleet.keyspace.records import RouteEndpoint, RouteRecord
from gpufleet_dev.staticroutes import StaticRoutes

CHAT = "/v1/chat/completions"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# --- stand-ins ------------------------------------------------------------------------------------


class FakeInstance:
    """A local instance: READY, in rotation unless told otherwise; records what the proxy reports."""

    def __init__(self, name: str, base_url: str, model: str = "m") -> None:
        self.name, self.model = name, model
        self.upstream = Upstream(base_url)
        self.state = InstanceState.READY
        self.in_rotation = True
        self.successes = 0
        self.failures: list[tuple[str, bool]] = []
        self.probes = 0
        self.watchers: set[Callable[[], None]] = set()

    @property
    def base_url(self) -> str:
        return self.upstream.base_url

    def routable(self, in_flight: int, *, suspect_ok: bool = False) -> bool:
        return self.state is InstanceState.READY and self.in_rotation

    def judge(self, status: int, body: bytes) -> Judgement:
        return Judgement(judge_status(status))

    def watch(self, on_leave: Callable[[], None]) -> None:
        self.watchers.add(on_leave)

    def unwatch(self, on_leave: Callable[[], None]) -> None:
        self.watchers.discard(on_leave)

    def request_probe(self) -> None:
        self.probes += 1

    def report_success(self) -> None:
        self.successes += 1

    def report_failure(self, detail: str, answered: bool = False) -> bool:
        self.failures.append((detail, answered))
        return False


FakeRoutes = StaticRoutes  # the name the other proxy tests import


class FakeUpstreams:
    def __init__(self, instances: list[FakeInstance], routes: FakeRoutes | None = None, **proxy: Any) -> None:
        self.instances = instances
        self.routes = routes
        self.node_id = "here"
        self.proxy_cfg = ProxySection(**{"connect_timeout_s": 1.0, "access_log": False, **proxy})
        self.degradation_cfg = DegradationSection()

    def local(self, model: str) -> list[LocalUpstream]:
        return [i for i in self.instances if i.model == model]

    def ready_models(self) -> list[ServedModel]:
        return sorted({ServedModel(i.model, 0.0, i.model) for i in self.instances if i.state is InstanceState.READY})

    def gpu_classes(self) -> set[str]:
        return {"A100"}

    def fallback_of(self, model: str) -> str | None:
        return None


def server_app(handler: Handler) -> web.Application:
    """A model server (or another node's proxy) answering every POST with ``handler``."""
    app = web.Application()
    app.router.add_post("/{tail:.*}", handler)
    return app


def ok(name: str) -> Handler:
    async def handle(request: web.Request) -> web.Response:
        return web.json_response({"served_by": name, "hops": request.headers.get(HOPS_HEADER)})

    return handle


def status(code: int, body: bytes = b'{"error": "nope"}') -> Handler:
    async def handle(_: web.Request) -> web.Response:
        return web.Response(status=code, body=body, content_type="application/json")

    return handle


def sse(chunks: list[bytes], *, die_before_first: bool = False) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)  # headers at once, as real servers send them
        if die_before_first:
            assert request.transport is not None
            request.transport.close()  # dies in "prefill": headers sent, no first chunk
            return resp
        for c in chunks:
            await resp.write(c)
        await resp.write_eof()
        return resp

    return handle


def refused_url() -> str:
    """An address where nothing listens: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
async def serve(aiohttp_server: Any) -> Callable[[Handler], Awaitable[str]]:
    async def start(handler: Handler) -> str:
        server: TestServer = await aiohttp_server(server_app(handler))
        return str(server.make_url("")).rstrip("/")

    return start


@pytest.fixture
def proxy_client(aiohttp_client: Any) -> Callable[..., Awaitable[Any]]:
    """``make(upstreams, key_gate=None)``: a test client in front of a Proxy; ``key_gate`` makes
    the proxy's KeyGate from the client's registry (test_key_enforcement.py)."""

    async def make(upstreams: FakeUpstreams, key_gate: Callable[[CollectorRegistry], Any] | None = None) -> Any:
        registry = CollectorRegistry(auto_describe=False)
        gate = key_gate(registry) if key_gate is not None else None
        proxy = Proxy(upstreams, ProxyMetrics(registry), key_gate=gate)
        app = web.Application()
        add_proxy(app, proxy)
        client = await aiohttp_client(app)
        client.proxy, client.registry, client.gate = proxy, registry, gate
        return client

    return make


def endpoint(address: str) -> RouteEndpoint:
    """Instance x on node "there", READY in the route table."""
    return RouteEndpoint(node="there", instance="x", address=address, gpu_class="A100", weight=100, state="READY")


def chat(model: str = "m", stream: bool = False) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}


def metrics(client: Any) -> str:
    return generate_latest(client.registry).decode()


# --- refused before any upstream ---------------------------------------------------------------


async def test_no_model_selected_is_400(proxy_client: Any) -> None:
    client = await proxy_client(FakeUpstreams([]))
    r = await client.post(CHAT, json={"messages": []}, headers={REQUEST_ID_HEADER: "rid-1"})
    body = await r.json()
    assert r.status == 400 and body["error"]["code"] == "missing_model"
    assert r.headers[REQUEST_ID_HEADER] == "rid-1"
    r = await client.post(CHAT, data=b"{not json")
    assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_json"
    assert 'gpu_agent_proxy_rejected_total{reason="bad_request"} 2.0' in metrics(client)


async def test_unknown_model_is_404_and_stays_out_of_the_labels(proxy_client: Any, serve: Any) -> None:
    client = await proxy_client(FakeUpstreams([FakeInstance("a", await serve(ok("a")))]))
    r = await client.post(CHAT, json=chat("nobody-serves-this"))
    body = await r.json()
    assert r.status == 404 and body["error"]["code"] == "model_not_found"
    assert 'gpu_agent_proxy_requests_total{code="404",model="_unknown"} 1.0' in metrics(client)
    assert client.proxy.stats.counters.requests == 1 and client.proxy.stats.counters.attempts == 0


async def test_models_lists_ready_local_models_and_routed_ones(proxy_client: Any, serve: Any) -> None:
    down = FakeInstance("b", await serve(ok("b")), model="down")
    down.state = InstanceState.UNHEALTHY
    ep = RouteEndpoint(
        node="there", instance="x", address="http://127.0.0.1:1", gpu_class="A100", weight=100, state="READY"
    )
    routes = FakeRoutes({"elsewhere": RouteRecord(model="elsewhere", epoch=1, updated_at=5.0, endpoints=[ep])})
    client = await proxy_client(FakeUpstreams([FakeInstance("a", await serve(ok("a"))), down], routes))
    r = await client.get("/v1/models")
    assert [m["id"] for m in (await r.json())["data"]] == ["m", "elsewhere"]


# --- retries before the first byte -------------------------------------------------------------------


async def test_refused_connection_is_retried_on_another_instance(proxy_client: Any, serve: Any) -> None:
    dead, good = FakeInstance("dead", refused_url()), FakeInstance("good", await serve(ok("good")))
    up = FakeUpstreams([dead, good])
    client = await proxy_client(up)
    for _ in range(4):  # ties rotate: the dead one comes first at least once
        r = await client.post(CHAT, json=chat())
        assert r.status == 200 and (await r.json())["served_by"] == "good"
    assert dead.failures and all(not answered for _, answered in dead.failures) and dead.probes
    assert good.successes == 4 and not good.failures
    stats = client.proxy.stats
    assert stats.upstreams["dead"].errors == len(dead.failures) and stats.upstreams["good"].requests == 4
    assert stats.upstreams["good"].in_flight == 0 and stats.counters.attempt_errors == len(dead.failures)
    assert 'gpu_agent_proxy_upstream_errors_total{instance="dead",kind="connect",model="m"}' in metrics(client)


async def test_5xx_before_the_first_byte_is_retried_and_the_last_answer_returned(proxy_client: Any, serve: Any) -> None:
    bad, good = FakeInstance("bad", await serve(status(500))), FakeInstance("good", await serve(ok("good")))
    client = await proxy_client(FakeUpstreams([bad, good]))
    for _ in range(4):
        r = await client.post(CHAT, json=chat())
        assert r.status == 200
    assert bad.failures and all(answered for _, answered in bad.failures)  # a 5xx is an answer
    assert 'gpu_agent_proxy_retries_total{model="m"}' in metrics(client)

    # Nothing else to try: the client gets the upstream's own 5xx, not a made-up one.
    alone = await proxy_client(FakeUpstreams([FakeInstance("bad", bad.base_url)]))
    r = await alone.post(CHAT, json=chat())
    assert r.status == 500 and await r.read() == b'{"error": "nope"}'


async def test_429_tries_another_instance_and_is_not_reported_as_a_failure(proxy_client: Any, serve: Any) -> None:
    full = FakeInstance("full", await serve(status(429)))
    client = await proxy_client(FakeUpstreams([full, FakeInstance("free", await serve(ok("free")))]))
    for _ in range(4):
        assert (await client.post(CHAT, json=chat())).status == 200
    assert not full.failures and not full.probes  # busy is not failing: no probe, no ejection
    assert client.proxy.stats.upstreams["full"].errors >= 1  # but it counts toward the error rate


async def test_client_errors_pass_through_without_retry(proxy_client: Any, serve: Any) -> None:
    a = FakeInstance("a", await serve(status(400, b'{"error": {"message": "bad parameter"}}')))
    b = FakeInstance("b", await serve(ok("b")))
    client = await proxy_client(FakeUpstreams([a, b], max_attempts=3))
    r = await client.post(CHAT, json=chat())
    assert r.status == 400 and (await r.json())["error"]["message"] == "bad parameter"
    stats = client.proxy.stats
    assert stats.counters.attempts == 1 and stats.counters.attempt_errors == 0  # one attempt, nothing counted
    assert a.successes == 1 and not a.failures  # answered: passive health hears a success


async def test_no_instance_in_rotation_is_503_with_retry_after(proxy_client: Any, serve: Any) -> None:
    a = FakeInstance("a", await serve(ok("a")))
    a.in_rotation = False
    client = await proxy_client(FakeUpstreams([a]))
    r = await client.post(CHAT, json=chat())
    body = await r.json()
    assert r.status == 503 and r.headers["Retry-After"] == "2" and body["error"]["code"] == "model_not_ready"
    assert "a READY" in body["error"]["message"]


# --- streams: the client's headers wait for the first chunk ---------------------------------------


async def test_a_stream_dying_before_its_first_chunk_is_retried_elsewhere(proxy_client: Any, serve: Any) -> None:
    chunks = [b'data: {"n": 1}\n\n', b'data: {"n": 2}\n\n', b"data: [DONE]\n\n"]
    dying = FakeInstance("dying", await serve(sse([], die_before_first=True)))
    good = FakeInstance("good", await serve(sse(chunks)))
    client = await proxy_client(FakeUpstreams([dying, good]))
    for _ in range(4):
        r = await client.post(CHAT, json=chat(stream=True))
        assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
        assert await r.read() == b"".join(chunks)
    assert dying.failures and "cut off" in dying.failures[0][0]


async def test_a_stream_dying_before_its_first_chunk_alone_gets_an_error_status_not_a_broken_stream(
    proxy_client: Any, serve: Any
) -> None:
    """Held back: the client never saw the upstream's 200, so it gets a proper error answer."""
    client = await proxy_client(FakeUpstreams([FakeInstance("dying", await serve(sse([], die_before_first=True)))]))
    r = await client.post(CHAT, json=chat(stream=True))
    body = await r.json()
    assert r.status == 503 and body["error"]["code"] == "model_not_ready"  # nothing else to try


async def test_after_the_first_chunk_a_dying_upstream_ends_the_stream_with_an_error_event(
    proxy_client: Any, serve: Any
) -> None:
    async def one_then_die(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"n": 1}\n\n')
        assert request.transport is not None
        request.transport.close()
        return resp

    a, b = FakeInstance("a", await serve(one_then_die)), FakeInstance("b", await serve(ok("b")))
    client = await proxy_client(FakeUpstreams([a, b]))
    r = await client.post(CHAT, json=chat(stream=True))
    text = (await r.read()).decode()
    assert r.status == 200 and text.startswith('data: {"n": 1}\n\n')  # not retried: the client has part
    assert '"code":"upstream_stream_error"' in text and "[DONE]" not in text
    assert client.proxy.stats.upstreams["a"].errors == 1 and a.probes == 1


async def test_no_first_chunk_within_the_limit_is_504(proxy_client: Any, serve: Any) -> None:
    release = asyncio.Event()

    async def silent(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await release.wait()  # a hung engine: headers, then nothing
        return resp

    a = FakeInstance("a", await serve(silent))
    client = await proxy_client(FakeUpstreams([a], ttfb_timeout_s=0.2))
    r = await client.post(CHAT, json=chat(stream=True))
    body = await r.json()
    assert r.status == 504 and body["error"]["code"] == "upstream_timeout"
    assert "no first chunk within 0.2s" in body["error"]["message"]
    assert a.failures and a.failures[0][1] is False  # silence, not an answer: counts toward a restart
    release.set()


# --- other nodes ------------------------------------------------------------------------------------


async def test_forwarded_to_another_node_once_and_never_back(proxy_client: Any, serve: Any) -> None:
    other = await serve(ok("other-node"))
    ep = endpoint(other)
    routes = FakeRoutes({"m": RouteRecord(model="m", epoch=1, updated_at=1.0, endpoints=[ep])})
    client = await proxy_client(FakeUpstreams([], routes))
    r = await client.post(CHAT, json=chat())
    assert r.status == 200 and await r.json() == {"served_by": "other-node", "hops": "1"}
    # Already forwarded once: not again (two nodes must not bounce it between them).
    r = await client.post(CHAT, json=chat(), headers={HOPS_HEADER: "1"})
    assert r.status == 503 and (await r.json())["error"]["message"] == "no instance of m is ready (no local instance)"
    # Attempts on other nodes are not this node's to count (each node counts its own instances).
    assert client.proxy.stats.counters.attempts == 0 and client.proxy.stats.upstreams["there/x"].requests == 1


async def test_a_forward_carries_our_headers_and_its_answer_keeps_the_serving_nodes_names(
    proxy_client: Any, serve: Any
) -> None:
    """What the other node gets: the client's headers (its Authorization too, in open mode: it
    may be that node's key), our request id, X-Forwarded-For and hop count in place of any the
    client sent. What the client gets back: the serving node's names as it set them (or where
    we sent it, from a node that set none), and our request id."""
    seen: list[dict[str, list[str]]] = []

    def other(names: bool) -> Handler:
        async def handle(request: web.Request) -> web.Response:
            seen.append({k.lower(): request.headers.getall(k) for k in request.headers})
            named = {NODE_HEADER: "far", INSTANCE_HEADER: "far-0"} if names else {}
            return web.json_response({"ok": True}, headers={REQUEST_ID_HEADER: "theirs", **named})

        return handle

    for names in (True, False):
        ep = RouteEndpoint(
            node="there", instance="x", address=await serve(other(names)), gpu_class="A100", weight=1, state="READY"
        )
        routes = FakeRoutes({"m": RouteRecord(model="m", epoch=1, updated_at=1.0, endpoints=[ep])})
        client = await proxy_client(FakeUpstreams([], routes))
        sent = {"Authorization": "Bearer node-key", "X-Custom": "kept", REQUEST_ID_HEADER: "rid-1"}
        r = await client.post(CHAT, json=chat(), headers={**sent, "X-Forwarded-For": "1.2.3.4"})
        assert r.status == 200
        got = seen.pop()
        assert got["authorization"] == ["Bearer node-key"] and got["x-custom"] == ["kept"]
        assert got[REQUEST_ID_HEADER.lower()] == ["rid-1"] and got[HOPS_HEADER.lower()] == ["1"]
        assert got["x-forwarded-for"] == ["127.0.0.1"]  # ours: the client's own is not passed on
        assert r.headers.getall(REQUEST_ID_HEADER) == ["rid-1"]
        assert r.headers.getall(NODE_HEADER) == (["far"] if names else ["there"])
        assert r.headers.getall(INSTANCE_HEADER) == (["far-0"] if names else ["x"])


async def test_a_failing_node_falls_back_to_a_local_instance_set_aside(proxy_client: Any, serve: Any) -> None:
    """Drained: new work goes to other nodes first; when they fail, the local instance serves."""
    ep = RouteEndpoint(
        node="there", instance="x", address=await serve(status(503)), gpu_class="A100", weight=100, state="READY"
    )
    routes = FakeRoutes({"m": RouteRecord(model="m", epoch=1, updated_at=1.0, endpoints=[ep])})
    routes.drained = True
    local = FakeInstance("local", await serve(ok("local")))
    client = await proxy_client(FakeUpstreams([local], routes))
    r = await client.post(CHAT, json=chat())
    assert r.status == 200 and (await r.json())["served_by"] == "local"
    assert client.proxy.stats.upstreams["there/x"].errors == 1 and local.successes == 1


def test_the_fake_upstreams_has_what_the_interface_names() -> None:
    """The fake is checked against the Protocol, so the tests follow the interface as it changes."""
    from agent.proxy.upstreams import LocalUpstream as Local
    from agent.proxy.upstreams import RouteView, Upstreams

    def members(proto: type) -> set[str]:
        return {n for n in vars(proto) if not n.startswith("_")} | set(getattr(proto, "__annotations__", {}))

    up = FakeUpstreams([], FakeRoutes({}))
    for obj, proto in ((up, Upstreams), (FakeInstance("a", "http://x"), Local), (up.routes, RouteView)):
        missing = {n for n in members(proto) if not hasattr(obj, n)}
        assert not missing, (proto.__name__, missing)


# --- load-aware picks and session affinity -------------------------------------------------------


def slow(name: str, delay_s: float) -> Handler:
    async def handle(request: web.Request) -> web.Response:
        await asyncio.sleep(delay_s)
        return web.json_response({"served_by": name})

    return handle


async def test_a_slow_node_sheds_its_share_to_a_fast_one(proxy_client: Any, serve: Any) -> None:
    """Two nodes of equal weight, one 20x slower: by weight alone each gets half of the
    requests; by load per weight the fast one takes most of them as requests pile up on the slow."""
    fast_url, slow_url = await serve(ok("fast")), await serve(slow("slow", 0.2))
    eps = [
        RouteEndpoint(node="fast", instance="x", address=fast_url, gpu_class="A100", weight=100, state="READY"),
        RouteEndpoint(node="slow", instance="x", address=slow_url, gpu_class="A100", weight=100, state="READY"),
    ]
    served: dict[str, Counter[str]] = {}
    for balance in ("round_robin", "least_loaded"):
        routes = FakeRoutes({"m": RouteRecord(model="m", epoch=1, updated_at=0.0, endpoints=eps)})
        client = await proxy_client(FakeUpstreams([], routes, remote_balance=balance))
        served[balance] = Counter()

        async def worker(client: Any = client, seen: Counter[str] = served[balance]) -> None:
            for _ in range(5):  # a closed loop: the next request when the last is answered
                r = await client.post(CHAT, json=chat())
                assert r.status == 200
                seen[(await r.json())["served_by"]] += 1

        await asyncio.gather(*(worker() for _ in range(4)))
    assert served["round_robin"] == {"fast": 10, "slow": 10}
    assert served["least_loaded"]["fast"] >= 15, served


async def test_a_session_sticks_to_one_instance_until_it_is_much_busier(proxy_client: Any, serve: Any) -> None:
    instances = [FakeInstance(n, await serve(ok(n))) for n in ("a", "b", "c")]
    client = await proxy_client(FakeUpstreams(instances, affinity_header="X-Session-ID", affinity_max_extra=2))

    async def served_by(session: str | None) -> str:
        r = await client.post(CHAT, json=chat(), headers={"X-Session-ID": session} if session else {})
        return (await r.json())["served_by"]

    homes = {s: {await served_by(s) for _ in range(4)} for s in ("alice", "bob", "carol", "dave", "erin")}
    assert all(len(h) == 1 for h in homes.values()), homes  # each session: one instance
    assert len(set().union(*homes.values())) > 1  # and the sessions spread
    assert len({await served_by(None) for _ in range(6)}) == 3  # no session: least in-flight, rotating
    home = next(iter(homes["alice"]))
    stats = client.proxy.stats.upstream(home)
    stats.in_flight += 3  # alice's instance is busy: more than 2 above the others
    try:
        assert await served_by("alice") != home
    finally:
        stats.in_flight -= 3
    assert await served_by("alice") == home  # and back once it is not
