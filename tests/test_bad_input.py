"""Bad input, property-based: whatever arrives (bytes, JSON of any shape, hostile names and
paths) gets a clear error or a valid value, never an exception out of a parser, a 5xx from
the agent, or a name that climbs out of its directory.

The parsers are tested directly with hypothesis; the HTTP surface with one real agent (and a
simulated vLLM behind it) fed hypothesis-generated bodies over real HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import json
import os
import re
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web
from helpers import (
    TOKEN,
    AgentProcess,
    CoordinatorProcess,
    agent_toml,
    free_port,
    instance_toml,
    start_agent_sync,
    wait_until,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.cluster.assignments import outside_roots
from agent.proxy.cache import cache_key
from agent.proxy.context import Head, parse_head
from gpufleet.keyspace import InvalidName, Keyspace, assigned_instance_name, check_model, check_name, decode_or_skip
from gpufleet.keyspace import records as R
from gpufleet.registry import path_problems, validate_model

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)
RECORDS = [
    R.NodeRecord,
    R.LeaderRecord,
    R.RouteRecord,
    R.ModelRecord,
    R.AssignmentRecord,
    R.DrainRecord,
    R.DegradationRecord,
    R.PlacementRecord,
]
SAFE_INSTANCE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def _is_400_json(resp: web.Response) -> bool:
    assert isinstance(resp.body, bytes)
    err = json.loads(resp.body)["error"]
    return resp.status == 400 and bool(err["message"]) and err["type"] == "invalid_request_error"


@given(st.binary(max_size=300))
def test_parse_head_never_raises_on_bytes(body: bytes) -> None:
    head = parse_head(body)
    assert (isinstance(head, Head) and head.model) or _is_400_json(head)  # type: ignore[arg-type]


@given(JSON)
def test_parse_head_on_any_json_shape(value: Any) -> None:
    head = parse_head(msgspec.json.encode(value))
    if isinstance(head, Head):
        assert isinstance(value, dict) and value["model"] == head.model and head.model
    else:
        assert _is_400_json(head)


@given(st.sampled_from(RECORDS), st.binary(max_size=200) | JSON.map(msgspec.json.encode))
def test_record_decoders_skip_bad_values(typ: type, value: bytes) -> None:
    rec = decode_or_skip("/gpufleet/x/fuzz", value, typ)
    assert rec is None or isinstance(rec, typ)


@given(st.dictionaries(st.text(max_size=8), JSON, max_size=6))
def test_cache_key_ignores_key_order_only(obj: dict[str, Any]) -> None:
    key = cache_key("/v1/chat/completions", msgspec.json.encode(obj))
    reordered = dict(reversed(list(obj.items())))
    assert key is not None and len(key) == 32
    assert cache_key("/v1/chat/completions", msgspec.json.encode(reordered)) == key
    assert cache_key("/v1/completions", msgspec.json.encode(obj)) != key


@given(st.binary(max_size=100))
def test_cache_key_on_garbage(body: bytes) -> None:
    key = cache_key("/p", body)
    assert key is None or len(key) == 32


@given(st.text(max_size=140))
def test_names_that_become_keys_cannot_climb_or_collide(name: str) -> None:
    keys = Keyspace("c")
    for kind, check, make in (("node", check_name, keys.node), ("model", check_model, keys.model)):
        try:
            (check(kind, name) if check is check_name else check(name))  # type: ignore[operator]
        except InvalidName:
            continue
        key = make(name)
        assert ".." not in name and "\x00" not in name and not name.startswith("/")
        assert key.count("/") == (4 if kind == "node" or "/" not in name else 5)
        assert SAFE_INSTANCE.match(assigned_instance_name(name))


@given(st.text(alphabet="/.ab-_\x00\n", max_size=30))
def test_accepted_model_paths_are_absolute_and_normalised(path: str) -> None:
    if path_problems(path):
        return
    assert path.startswith("/") and os.path.normpath(path) == path and ".." not in path.split("/")
    if not outside_roots(path, ["/a"]):
        assert os.path.commonpath([path, "/a"]) == "/a"


@given(
    st.builds(
        R.ModelRecord,
        name=st.text(max_size=20),
        path=st.text(max_size=20),
        replicas=st.integers(-5, 5000),
        min_vram_gib=st.none() | st.floats(allow_nan=False),
        classes=st.lists(st.text(max_size=8), max_size=3),
        sha256=st.none() | st.text(max_size=70),
        fallback=st.none() | st.text(max_size=10),
        gpu_memory_fraction=st.none() | st.floats(allow_nan=False),
    )
)
def test_validate_model_names_every_problem_by_field(rec: R.ModelRecord) -> None:
    fields = {"name", "path", "replicas", "min_vram_gib", "classes", "sha256", "fallback", "gpu_memory_fraction"}
    for problem in validate_model(rec):
        assert problem.split(":", 1)[0] in fields | {"size_bytes", "args"}


# --- a live agent -------------------------------------------------------------------------------


# A small body limit, so a decompression bomb past it is cheap to send.
PROXY_LIMITS = "\n[proxy]\nmax_body_bytes = 65536\n"


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    port = free_port()
    config = agent_toml(tmp, port, instance_toml("m", model="m") + PROXY_LIMITS)
    a = start_agent_sync(tmp, config, port, ready_instances=1)
    try:
        yield a
    finally:
        a.stop()


def _post(url: str, body: bytes, token: str | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


CHAT_BODIES = (
    st.binary(max_size=200)
    | JSON.map(msgspec.json.encode)
    | st.fixed_dictionaries(
        {"model": st.just("m")},
        optional={
            "messages": JSON,
            "max_tokens": JSON,
            "stream": JSON,
            "temperature": JSON,
            "prompt": JSON,
            "n": JSON,
        },
    ).map(msgspec.json.encode)
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=CHAT_BODIES, path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]))
def test_proxy_answers_any_body_without_a_5xx(agent: AgentProcess, body: bytes, path: str) -> None:
    status, payload = _post(agent.base + path, body)
    assert status < 500, (status, payload[:300])
    if status >= 400:
        doc = json.loads(payload)
        # The proxy's own errors are OpenAI-shaped; a model server's 4xx passes through as it
        # was sent (vLLM's shape: {"object": "error", "message": ...}).
        assert doc["error"]["message"] if "error" in doc else (doc["object"] == "error" and doc["message"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.binary(max_size=100) | JSON.map(msgspec.json.encode),
    path=st.sampled_from(["/admin/gpus/0", "/admin/gpus/7", "/admin/reload", "/admin/instances/m/nope"]),
)
def test_admin_api_answers_any_body_without_a_5xx(agent: AgentProcess, body: bytes, path: str) -> None:
    status, payload = _post(agent.base + path, body, TOKEN)
    assert status < 500, (status, payload[:300])
    if status >= 400:
        assert json.loads(payload)["error"]
    assert _post(agent.base + path, body)[0] == 401  # and nothing without the token


def test_the_agent_survived_the_fuzzing(agent: AgentProcess) -> None:
    with urllib.request.urlopen(agent.base + "/v1/status", timeout=5) as r:
        st_ = json.loads(r.read())
    assert [i["state"] for i in st_["instances"]] == ["READY"]
    assert "Traceback" not in agent.log_path.read_text()


# --- hostile bytes and headers, every route ---------------------------------------------------------
#
# Raw requests over a socket, so the bytes are exactly what a hostile or broken client sends
# (urllib and aiohttp refuse to send most of them). Every answer must be a 4xx in OpenAI's error
# shape (or the route's normal answer), never a 5xx, a plain-text aiohttp page or a traceback;
# and no client's bad request may count as an upstream failure (the cluster's degradation level
# is computed from those counters).

AGENT_GET = ["/healthz", "/readyz", "/v1/status", "/metrics", "/v1/models", "/nope"]
AGENT_POST = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/admin/gpus/0",
    "/admin/reload",
    "/admin/instances/m/nope",
]
DEEP = b"[" * 5000 + b"]" * 5000
HOSTILE_BODIES: dict[str, bytes] = {
    "model name not UTF-8": b'{"model": "\xff\xfe\xc3", "messages": []}',
    "message not UTF-8": b'{"model": "m", "messages": [{"role": "user", "content": "\xc3\x28"}]}',
    "lone surrogate escape": b'{"model": "\\udc80", "messages": []}',
    "nested 5000 deep": b'{"model": "m", "messages": ' + DEEP + b"}",
    "nested 5000 deep at the top": DEEP,
    "objects nested 2000 deep": b'{"model": "m", "x": ' + b'{"a":' * 2000 + b"1" + b"}" * 2000 + b"}",
    "NUL bytes": b'{"model": "m\x00", "messages": []}\x00\x00',
    "not JSON": b"\x80\x81\x82\xff" * 50,
}
HOSTILE_HEADERS: dict[str, bytes] = {
    "Authorization not UTF-8": b"Authorization: Bearer \xff\xfe\xfd" + TOKEN.encode() + b"\r\n",
    "Authorization latin-1": b"Authorization: Bearer caf\xe9-" + TOKEN.encode() + b"\r\n",
    "X-Request-ID not UTF-8": b"X-Request-ID: \xc3\x28\xa0\xa1\r\n",
    "header name not a token": b"X-B\xffd: 1\r\n",
    "oversized header": b"X-Big: " + b"a" * 20000 + b"\r\n",
    "200 headers": b"".join(b"X-H%d: v\r\n" % i for i in range(200)),
    "header without colon": b"this is not a header\r\n",
}


def raw_request(port: int, head: bytes, body: bytes = b"", timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """Send ``head`` (request line and headers, without the blank line) and ``body`` as they are;
    the status, headers and body of the answer."""
    import http.client
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head + b"\r\n" + body)
        resp = http.client.HTTPResponse(s)
        resp.begin()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()


def request_head(method: str, path: str, extra: bytes = b"", body: bytes = b"") -> bytes:
    return (
        f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n".encode()
        + (b"Content-Length: %d\r\n" % len(body) if method == "POST" else b"")
        + extra
    )


def assert_clean_error(what: str, status: int, headers: dict[str, str], payload: bytes) -> None:
    assert status < 500, (what, status, payload[:300])
    if status >= 400:
        assert headers.get("content-type", "").startswith("application/json"), (what, status, headers, payload[:200])
        doc = json.loads(payload)
        # The proxy's own errors are OpenAI-shaped; a model server's 4xx passes through as sent.
        assert doc["error"]["message"] if "error" in doc else doc["object"] == "error", (what, doc)


def _attempt_errors(agent: AgentProcess) -> tuple[int, int]:
    with urllib.request.urlopen(agent.base + "/v1/status", timeout=5) as r:
        st_ = json.loads(r.read())
    return st_["proxy"]["attempt_errors"], sum(i.get("errors_total", 0) for i in st_["instances"])


@pytest.mark.parametrize("what", sorted(HOSTILE_BODIES))
def test_hostile_bodies_get_a_4xx_on_every_route(agent: AgentProcess, what: str) -> None:
    body = HOSTILE_BODIES[what]
    before = _attempt_errors(agent)
    for path in AGENT_POST:
        for auth in (b"", b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"):
            status, headers, payload = raw_request(agent.port, request_head("POST", path, auth, body), body)
            assert_clean_error(f"{what} POST {path}", status, headers, payload)
            if path.startswith("/v1/"):
                assert status in (400, 404), (what, path, status, payload[:200])
    assert _attempt_errors(agent) == before  # the client's fault counts as no upstream failure


@pytest.mark.parametrize("what", sorted(HOSTILE_HEADERS))
def test_hostile_headers_get_a_4xx_on_every_route(agent: AgentProcess, what: str) -> None:
    extra = HOSTILE_HEADERS[what]
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
    before = _attempt_errors(agent)
    for method, path in [("GET", p) for p in AGENT_GET] + [("POST", p) for p in AGENT_POST]:
        sent = body if method == "POST" else b""
        status, headers, payload = raw_request(agent.port, request_head(method, path, extra, sent), sent)
        assert_clean_error(f"{what} {method} {path}", status, headers, payload)
        if path.startswith("/admin/"):
            assert status in (400, 401), (what, path, status)  # never let a mangled token in
    assert _attempt_errors(agent) == before


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    value=st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    name=st.sampled_from([b"Authorization", b"X-Request-ID", b"Content-Encoding", b"Content-Type", b"Accept"]),
    path=st.sampled_from(["/v1/chat/completions", "/admin/reload", "/v1/models"]),
)
def test_any_header_bytes_get_a_clean_answer(agent: AgentProcess, value: bytes, name: bytes, path: str) -> None:
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}'
    method = "GET" if path == "/v1/models" else "POST"
    sent = body if method == "POST" else b""
    status, headers, payload = raw_request(
        agent.port, request_head(method, path, name + b": " + value + b"\r\n", sent), sent
    )
    assert_clean_error(f"{name!r}: {value!r}", status, headers, payload)


@pytest.mark.parametrize(
    "what,head_tail",
    [
        ("request line too long", b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n"),
        ("not HTTP", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n"),
        ("bad method", b"G\xffT / HTTP/1.1\r\n"),
        ("bad version", b"GET / HTTP/9.9\r\n"),
        ("path not UTF-8", b"GET /v1/\xff\xfe HTTP/1.1\r\n"),
        ("query not UTF-8", b"POST /v1/chat/completions?x=\xc3\x28 HTTP/1.1\r\nContent-Length: 0\r\n"),
        ("bad content length", b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: -5\r\n"),
        ("two content lengths", b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n"),
    ],
)
def test_malformed_requests_get_a_json_400_and_one_log_line(agent: AgentProcess, what: str, head_tail: bytes) -> None:
    lines_before = len(agent.log_lines())
    status, headers, payload = raw_request(agent.port, head_tail + b"Host: x\r\nConnection: close\r\n")
    assert status == 400, (what, status, payload[:200])
    assert_clean_error(what, status, headers, payload)

    def logged() -> list[str]:
        return [ln for ln in agent.log_lines()[lines_before:] if "bad HTTP request" in ln]

    deadline = time.monotonic() + 5
    while not logged() and time.monotonic() < deadline:  # the agent writes its log line after answering
        time.sleep(0.05)
    new = agent.log_lines()[lines_before:]
    assert logged(), new
    for line in new:  # every line JSON: no plain-text traceback from aiohttp's own logger
        json.loads(line)


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data)


def test_compressed_bodies_are_decoded_and_forwarded_plain(agent: AgentProcess) -> None:
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'
    before = _attempt_errors(agent)
    for enc, data in (("gzip", _gzip(body)), ("deflate", zlib.compress(body))):
        head = request_head("POST", "/v1/chat/completions", f"Content-Encoding: {enc}\r\n".encode(), data)
        status, _, payload = raw_request(agent.port, head, data)
        assert status == 200, (enc, payload[:300])
        assert json.loads(payload)["choices"]
    # Not decodable, not supported, or bigger than max_body_bytes once decoded: the client's fault.
    bomb = _gzip(b"{" + b" " * (70 * 1024) + b"}")
    for enc, data, want in (
        ("gzip", b"\x1f\x8b\x08\x00garbage" * 10, 400),
        ("compress", body, 415),
        ("gzip, identity, x-custom", body, 415),
        ("gzip", bomb, 413),
    ):
        head = request_head("POST", "/v1/chat/completions", f"Content-Encoding: {enc}\r\n".encode(), data)
        status, headers, payload = raw_request(agent.port, head, data)
        assert status == want, (enc, status, payload[:300])
        assert_clean_error(enc, status, headers, payload)
    assert _attempt_errors(agent) == before


def test_the_agent_survived_the_hostile_bytes(agent: AgentProcess) -> None:
    test_the_agent_survived_the_fuzzing(agent)
    for line in agent.log_lines():
        doc = json.loads(line)  # one JSON object per line: nothing else reached the log
        assert doc.get("level") not in ("error", "critical"), doc
        assert TOKEN not in line


# --- the coordinator's API: the same listener, the same class of input ----------------------------------


@pytest.fixture(scope="module")
def coordinator(etcd: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoordinatorProcess]:
    c = CoordinatorProcess(tmp_path_factory.mktemp("coord"), "c1", etcd.endpoints, "fuzz").start()
    try:
        yield c.wait_ready_sync()
    finally:
        c.stop()


def test_coordinator_answers_hostile_requests_in_json(coordinator: CoordinatorProcess) -> None:
    cases = [("GET", p) for p in ("/healthz", "/readyz", "/v1/status", "/metrics", "/nope")] + [("POST", "/v1/status")]
    for what, extra in HOSTILE_HEADERS.items():
        for method, path in cases:
            body = HOSTILE_BODIES["nested 5000 deep"] if method == "POST" else b""
            status, headers, payload = raw_request(coordinator.port, request_head(method, path, extra, body), body)
            assert_clean_error(f"{what} {method} {path}", status, headers, payload)
    status, headers, payload = raw_request(coordinator.port, b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n")
    assert status == 400
    assert_clean_error("request line too long", status, headers, payload)
    assert coordinator.status()["id"] == "c1"
    for line in coordinator.log_lines():
        doc = json.loads(line)  # JSON lines only: aiohttp's plain-text tracebacks do not reach the log
        assert doc.get("level") not in ("error", "critical"), doc


# --- the admin token file's permissions -------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode,starts,warns",
    [(0o600, True, False), (0o640, True, False), (0o644, True, True), (0o660, True, True), (0o666, False, True)],
)
def test_admin_token_file_permissions(tmp_path: Path, mode: int, starts: bool, warns: bool) -> None:
    from structlog.testing import capture_logs

    from agent.api.auth import AdminToken, TokenError
    from agent.cli import main as agent_cli

    token_file = tmp_path / "admin-token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(mode)
    with capture_logs() as logs:
        try:
            AdminToken(str(token_file)).ensure(generate=False)
            started = True
        except TokenError as e:
            started = False
            assert "writable by every user" in str(e) and TOKEN not in str(e)
    assert started is starts
    if starts:
        assert any(e["log_level"] == "warning" and "token" in e["event"] for e in logs) is warns, logs
    # check-config says the same (exit 78 where the agent would not start) ...
    config = tmp_path / "agent.toml"
    text = agent_toml(tmp_path, free_port(), "", token=False).replace(
        'log_format = "json"', f'log_format = "json"\nadmin_token_file = "{token_file}"'
    )
    config.write_text(text)
    token_file.chmod(mode)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = agent_cli(["check-config", str(config)])
    assert code == (0 if starts else 78), err.getvalue()
    assert ("$.agent.admin_token_file" in err.getvalue()) is (warns or not starts), err.getvalue()
    # ... and so does gpuctl check, for the agent configured on the machine it runs on.
    from gpuctl.check import Facts, judge, local_token_file

    facts = Facts(endpoints=[], statuses={}, local_token_file=local_token_file(str(config)))
    verdict = {r.name: r.status for r in judge(facts)}["admin token file readable by the agent only"]
    assert verdict == ("FAIL" if warns or not starts else "PASS")


# --- the listener's phases, in-process with short limits -------------------------------------------------


class Listener:
    """An app on a guarded runner (gpufleet/httpserver.py) on a free port: /fast, and /slow,
    which answers when ``release`` is set."""

    def __init__(self, cap: int) -> None:
        from gpufleet.httpserver import ApiSection, ConnectionGuard

        self.limits = ApiSection(header_timeout_s=0.4, body_timeout_s=0.4, keepalive_timeout_s=1.0)
        self.guard = ConnectionGuard(self.limits, cap)
        self.release = asyncio.Event()

    async def __aenter__(self) -> Listener:
        from gpufleet.httpserver import GuardedRunner

        async def fast(_: web.Request) -> web.Response:
            return web.Response(text="ok")

        async def slow(_: web.Request) -> web.Response:
            await self.release.wait()
            return web.Response(text="done")

        app = web.Application()
        app.router.add_get("/fast", fast)
        app.router.add_get("/slow", slow)
        self.runner = GuardedRunner(app, self.guard, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        await self.runner.cleanup()

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)


async def read_response(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
    return head + await reader.readexactly(length)


async def closed_after(reader: asyncio.StreamReader, since: float) -> float:
    with contextlib.suppress(ConnectionError):
        await asyncio.wait_for(reader.read(), 5)
    return time.monotonic() - since


GET = b"GET /%s HTTP/1.1\r\nHost: x\r\n\r\n"


async def test_keepalive_idle_limit_is_not_the_header_timeout() -> None:
    async with Listener(cap=8) as srv:
        reader, writer = await srv.connect()
        writer.write(GET % b"fast")
        assert (await read_response(reader)).startswith(b"HTTP/1.1 200")
        await asyncio.sleep(0.6)  # idle past the header timeout (0.4 s), within keep-alive (1 s)
        writer.write(GET % b"fast")
        assert (await read_response(reader)).startswith(b"HTTP/1.1 200")
        held = await closed_after(reader, time.monotonic())
        assert 0.9 <= held < 2.5, held  # then closed at the keep-alive limit, without an answer
        # A request started on a kept-alive connection gets the header timeout from its first byte.
        reader, writer = await srv.connect()
        writer.write(GET % b"fast")
        await read_response(reader)
        writer.write(b"GET /fast HTTP/1.1\r\n")
        t0 = time.monotonic()
        held = await closed_after(reader, t0)
        assert 0.35 <= held < 1.0, held
        writer.close()


async def test_at_the_cap_waiting_connections_are_evicted_and_busy_ones_kept() -> None:
    async with Listener(cap=4) as srv:
        idle = [await srv.connect() for _ in range(2)]
        busy = [await srv.connect() for _ in range(2)]
        for _, w in busy:
            w.write(GET % b"slow")
        await wait_until(lambda: srv.guard.open == 4, timeout=5)
        await asyncio.sleep(0.1)  # past the 50 ms a new connection is protected from eviction
        # A new client gets in: the connection waiting longest (without a request) makes room.
        reader, writer = await srv.connect()
        writer.write(GET % b"fast")
        assert (await read_response(reader)).startswith(b"HTTP/1.1 200")
        assert srv.guard.shed["evicted"] == 1
        assert await idle[0][0].read() == b""  # the oldest idle one, closed without an answer
        # Every connection busy (the idle one left is made busy too): a newcomer gets a JSON 503.
        idle[1][1].write(GET % b"slow")
        writer.write(GET % b"slow")
        await asyncio.sleep(0.1)  # the requests reach their handlers (no condition to wait on from here)
        r, w = await srv.connect()
        answer = await asyncio.wait_for(r.read(), 5)
        assert answer.startswith(b"HTTP/1.1 503") and b'"too_many_connections"' in answer, answer
        assert srv.guard.shed["refused"] == 1
        srv.release.set()
        for reader, _ in busy:
            assert (await read_response(reader)).startswith(b"HTTP/1.1 200")  # the busy ones were kept


async def test_at_the_cap_a_new_connection_is_evicted_once_read_from(monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection accepted a moment ago is protected from eviction until the server has read
    from it; one that sent bytes (a flood that reconnects at once and trickles its head) is not,
    however young, so such a flood cannot keep the oldest waiter young and lock everyone out."""
    import gpufleet.httpserver as hs

    monkeypatch.setattr(hs, "EVICT_GRACE_S", 3600.0)  # only having been read counts here
    async with Listener(cap=4) as srv:
        silent = [await srv.connect() for _ in range(4)]
        await wait_until(lambda: srv.guard.open == 4, timeout=5)
        reader, _ = await srv.connect()
        answer = await asyncio.wait_for(reader.read(), 5)
        assert answer.startswith(b"HTTP/1.1 503"), answer  # none was read from: none evicted
        for _, w in silent:
            w.write(b"GET /fast HTTP/1.1\r\n")  # a head that never ends
        waiting = srv.guard._waiting
        await wait_until(lambda: len(waiting) == 4 and all(h.heard for h in waiting), timeout=5)
        reader, writer = await srv.connect()
        writer.write(GET % b"fast")
        assert (await read_response(reader)).startswith(b"HTTP/1.1 200")
        assert srv.guard.shed == {"evicted": 1, "refused": 1}
        assert await silent[0][0].read() == b""  # the longest waiting, closed without an answer


async def test_drain_for_a_handover_closes_every_connection_without_a_reset() -> None:
    """Before the listening socket goes to the next agent: a kept-alive connection that gets its
    next request is answered and closed (Connection: close), not reset under the client; one
    that stays idle is closed after idle_s; a request in progress finishes first."""
    async with Listener(cap=8) as srv:
        reusing, quiet, busy = [await srv.connect() for _ in range(3)]
        for _, w in (reusing, quiet):
            w.write(GET % b"fast")
        for r, _ in (reusing, quiet):
            assert (await read_response(r)).startswith(b"HTTP/1.1 200")
        busy[1].write(GET % b"slow")
        await wait_until(lambda: srv.guard.open == 3 and sum(h.idle for h in srv.guard._waiting) == 2, timeout=5)
        t0 = time.monotonic()
        drain = asyncio.create_task(srv.guard.drain(idle_s=0.3, timeout_s=5))
        reusing[1].write(GET % b"fast")  # the client's next request, as the drain begins
        answer = await read_response(reusing[0])
        assert answer.startswith(b"HTTP/1.1 200") and b"Connection: close" in answer, answer
        assert await reusing[0].read() == b""
        assert await quiet[0].read() == b""  # closed, without an answer
        assert 0.25 <= time.monotonic() - t0 < 3
        assert not drain.done()  # the slow request is still in progress
        srv.release.set()
        answer = await read_response(busy[0])
        assert answer.startswith(b"HTTP/1.1 200") and b"Connection: close" in answer, answer
        assert await asyncio.wait_for(drain, 5) == 0
