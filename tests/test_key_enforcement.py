"""API keys on the OpenAI routes, in process: a real ``Proxy`` with a real ``KeyGate`` over the
fake upstreams of test_proxy_inprocess.py, real aiohttp apps standing in for model servers and
another node. Every refusal in OpenAI's error shape; the client's key never reaches a model
server; limits with OpenAI's headers; usage counted from answers and streams (and the usage
event asked for on the client's behalf hidden from it); hops trusted only when signed."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from test_proxy_inprocess import (
    CHAT,
    FakeInstance,
    FakeRoutes,
    FakeUpstreams,
    chat,
    endpoint,
    proxy_client,  # noqa: F401  (a fixture)
    serve,  # noqa: F401  (a fixture)
)

from agent.backends import Upstream
from agent.keys.config import AuthSection
from agent.keys.gate import KeyGate
from agent.keys.source import KeySource
from gpufleet.apikeys import new_secret, secret_record
from gpufleet.facts import HOP_AUTH_HEADER, HOPS_HEADER, KEY_NAME_HEADER
from gpufleet.hopauth import body_digest, sign
from gpufleet.keyspace.records import ApiKeyRecord, RouteRecord

HOP_SECRET = b"h" * 32


class StaticKeys(KeySource):
    def __init__(self, records: list[ApiKeyRecord] | None) -> None:
        super().__init__()
        if records is not None:
            self._use(records, "file")


def make_key(name: str, **fields: Any) -> tuple[ApiKeyRecord, str]:
    secret = new_secret()
    now = time.time()
    rec = ApiKeyRecord(name=name, created_at=now, secrets=[secret_record(secret, now)])
    return msgspec.structs.replace(rec, **fields), secret


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def echo(name: str, usage: dict[str, int] | None = None) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A model server that says who it is, which credential reached it, and its usage."""

    async def handle(request: web.Request) -> web.Response:
        body: dict[str, Any] = {
            "served_by": name,
            "authorization": request.headers.get("Authorization"),
            "x_api_key": request.headers.get("x-api-key"),
            "hop_auth": request.headers.get(HOP_AUTH_HEADER),
            "key_name": request.headers.get(KEY_NAME_HEADER),
        }
        if usage:
            body["usage"] = usage
        return web.json_response(body)

    return handle


def streaming(usage: dict[str, int]) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Streams like vLLM: the usage event only when the request asks for it."""

    async def handle(request: web.Request) -> web.StreamResponse:
        req = await request.json()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for word in ("Hel", "lo"):
            await resp.write(b"data: " + json.dumps({"choices": [{"delta": {"content": word}}]}).encode() + b"\n\n")
        if (req.get("stream_options") or {}).get("include_usage"):
            await resp.write(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    return handle


@pytest.fixture
def keyed_client(proxy_client: Any) -> Callable[..., Awaitable[Any]]:  # noqa: F811
    async def make(
        upstreams: FakeUpstreams,
        keys: list[ApiKeyRecord] | None,
        *,
        mode: str = "keys",
        hop_secret: bytes | None = None,
        entry_nodes: int = 1,
    ) -> Any:
        source = StaticKeys(keys)

        def gate(registry: CollectorRegistry) -> KeyGate:
            g = KeyGate(
                auth=lambda: AuthSection(mode=mode),  # type: ignore[arg-type]
                listen_host="0.0.0.0",
                node_id="here",
                source=lambda: source,
                entry_nodes=lambda: entry_nodes,
                registry=registry,
            )
            g.hop_secrets = [hop_secret] if hop_secret else []
            return g

        return await proxy_client(upstreams, gate)

    return make


def metrics(client: Any) -> str:
    return generate_latest(client.registry).decode()


async def test_every_refusal_in_openai_shape_and_the_key_stays_here(keyed_client: Any, serve: Any) -> None:  # noqa: F811
    good, good_s = make_key("good", models=["m"])
    old, old_s = make_key("old", expires_at=time.time() - 1)
    gone, gone_s = make_key("gone", revoked_at=time.time() - 1)
    client = await keyed_client(FakeUpstreams([FakeInstance("a", await serve(echo("a")))]), [good, old, gone])

    cases = [
        ({}, 401, "missing_api_key"),
        (bearer("sk-not-ours"), 401, "invalid_api_key"),
        (bearer(new_secret()), 401, "invalid_api_key"),
        (bearer(old_s), 401, "expired_api_key"),
        (bearer(gone_s), 401, "invalid_api_key"),
    ]
    for headers, code, error_code in cases:
        r = await client.post(CHAT, json=chat(), headers=headers)
        body = await r.json()
        assert (r.status, body["error"]["code"]) == (code, error_code), headers
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert good_s not in json.dumps(body)
    r = await client.post(CHAT, json=chat("other"), headers=bearer(good_s))
    assert r.status == 403 and (await r.json())["error"]["code"] == "model_not_allowed"

    for headers in (bearer(good_s), {"x-api-key": good_s}):
        r = await client.post(CHAT, json=chat(), headers=headers)
        body = await r.json()
        assert r.status == 200 and body["served_by"] == "a"
        assert body["authorization"] is None and body["x_api_key"] is None  # stripped before the server
    assert 'gpu_agent_key_requests_total{key="good",model="m",status="200"} 2.0' in metrics(client)
    assert 'gpu_agent_key_refusals_total{reason="expired"} 1.0' in metrics(client)


async def test_the_instances_own_key_replaces_the_clients(keyed_client: Any, serve: Any) -> None:  # noqa: F811
    rec, secret = make_key("k")
    inst = FakeInstance("a", await serve(echo("a")))
    inst.upstream = Upstream(inst.base_url, {"Authorization": "Bearer server-key"})
    client = await keyed_client(FakeUpstreams([inst]), [rec])
    body = await (await client.post(CHAT, json=chat(), headers=bearer(secret))).json()
    assert body["authorization"] == "Bearer server-key"


async def test_no_key_set_yet_is_503_not_a_free_pass(keyed_client: Any, serve: Any) -> None:  # noqa: F811
    client = await keyed_client(FakeUpstreams([FakeInstance("a", await serve(echo("a")))]), None)
    r = await client.post(CHAT, json=chat(), headers=bearer(new_secret()))
    assert r.status == 503 and r.headers["Retry-After"] == "2"


async def test_open_mode_lets_everyone_through_and_passes_authorization_on(keyed_client: Any, serve: Any) -> None:  # noqa: F811
    client = await keyed_client(FakeUpstreams([FakeInstance("a", await serve(echo("a")))]), None, mode="open")
    body = await (await client.post(CHAT, json=chat(), headers=bearer("server-side-key"))).json()
    assert body["served_by"] == "a" and body["authorization"] == "Bearer server-side-key"


async def test_rpm_limit_with_openai_headers(keyed_client: Any, serve: Any) -> None:  # noqa: F811
    rec, secret = make_key("k", rpm=3)
    client = await keyed_client(FakeUpstreams([FakeInstance("a", await serve(echo("a")))]), [rec])
    remaining = []
    for _ in range(3):
        r = await client.post(CHAT, json=chat(), headers=bearer(secret))
        assert r.status == 200
        assert r.headers["x-ratelimit-limit-requests"] == "3"
        remaining.append(r.headers["x-ratelimit-remaining-requests"])
    assert remaining == ["2", "1", "0"]
    r = await client.post(CHAT, json=chat(), headers=bearer(secret))
    body = await r.json()
    assert r.status == 429 and body["error"]["code"] == "rate_limit_exceeded" and body["error"]["type"] == "requests"
    assert 1 <= int(r.headers["Retry-After"]) <= 60


async def test_a_node_enforces_its_share_of_the_fleets_limit(keyed_client: Any, serve: Any) -> None:  # noqa: F811
    rec, secret = make_key("k", rpm=10)
    client = await keyed_client(FakeUpstreams([FakeInstance("a", await serve(echo("a")))]), [rec], entry_nodes=5)
    codes = [(await client.post(CHAT, json=chat(), headers=bearer(secret))).status for _ in range(4)]
    assert codes == [200, 200, 429, 429]  # 10 rpm over 5 entry nodes: 2 here


async def test_usage_is_counted_and_tpm_enforced(keyed_client: Any, serve: Any) -> None:  # noqa: F811
    rec, secret = make_key("k", tpm=100)
    usage = {"prompt_tokens": 40, "completion_tokens": 30, "total_tokens": 70}
    client = await keyed_client(FakeUpstreams([FakeInstance("a", await serve(echo("a", usage)))]), [rec])
    assert (await client.post(CHAT, json=chat(), headers=bearer(secret))).status == 200
    assert (await client.post(CHAT, json=chat(), headers=bearer(secret))).status == 200  # 70 < 100: admitted
    r = await client.post(CHAT, json=chat(), headers=bearer(secret))
    assert r.status == 429 and (await r.json())["error"]["type"] == "tokens"
    m = metrics(client)
    assert 'gpu_agent_key_tokens_total{key="k",kind="prompt",model="m"} 80.0' in m
    assert 'gpu_agent_key_tokens_total{key="k",kind="completion",model="m"} 60.0' in m


async def test_stream_usage_is_asked_for_and_hidden_from_a_client_that_did_not(keyed_client: Any, serve: Any) -> None:  # noqa: F811
    rec, secret = make_key("k")
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    client = await keyed_client(FakeUpstreams([FakeInstance("a", await serve(streaming(usage)))]), [rec])
    r = await client.post(CHAT, json=chat(stream=True), headers=bearer(secret))
    text = await r.text()
    assert r.status == 200 and "usage" not in text and text.endswith("data: [DONE]\n\n")
    asked = chat(stream=True) | {"stream_options": {"include_usage": True}}
    text = await (await client.post(CHAT, json=asked, headers=bearer(secret))).text()
    assert '"usage"' in text  # the client asked: it gets the event
    m = metrics(client)
    assert 'gpu_agent_key_tokens_total{key="k",kind="prompt",model="m"} 10.0' in m
    assert 'gpu_agent_key_tokens_total{key="k",kind="completion",model="m"} 4.0' in m


async def test_hops_are_trusted_only_when_signed(keyed_client: Any, serve: Any) -> None:  # noqa: F811
    client = await keyed_client(FakeUpstreams([FakeInstance("a", await serve(echo("a")))]), [], hop_secret=HOP_SECRET)
    body = json.dumps(chat()).encode()
    forged = {HOPS_HEADER: "1", "Content-Type": "application/json"}
    r = await client.post(CHAT, data=body, headers=forged)
    assert r.status == 401 and (await r.json())["error"]["code"] == "invalid_hop_signature"
    wrong = forged | {HOP_AUTH_HEADER: sign(b"x" * 32, "POST", CHAT, 1, int(time.time()), body_digest(body))}
    assert (await client.post(CHAT, data=body, headers=wrong)).status == 401
    signed = forged | {
        HOP_AUTH_HEADER: sign(HOP_SECRET, "POST", CHAT, 1, int(time.time()), body_digest(body), "team"),
        KEY_NAME_HEADER: "team",
    }
    r = await client.post(CHAT, data=body, headers=signed)
    assert r.status == 200 and (await r.json())["served_by"] == "a"
    altered = signed | {KEY_NAME_HEADER: "someone-else"}
    assert (await client.post(CHAT, data=body, headers=altered)).status == 401


async def test_a_forward_carries_a_signature_not_the_clients_key(keyed_client: Any, serve: Any) -> None:  # noqa: F811
    rec, secret = make_key("team")
    there = await serve(echo("there"))
    routes = FakeRoutes({"m": RouteRecord(model="m", epoch=1, updated_at=0.0, endpoints=[endpoint(there)])})
    client = await keyed_client(FakeUpstreams([], routes), [rec], hop_secret=HOP_SECRET)
    body = await (await client.post(CHAT, json=chat(), headers=bearer(secret))).json()
    assert body["served_by"] == "there"
    assert body["authorization"] is None and body["key_name"] == "team"
    assert body["hop_auth"].startswith("v1 ")


async def test_the_model_list_needs_a_key_and_shows_only_the_keys_models(keyed_client: Any, serve: Any) -> None:  # noqa: F811
    narrow, narrow_s = make_key("narrow", models=["m"])
    wide, wide_s = make_key("wide")
    url = await serve(echo("a"))
    client = await keyed_client(
        FakeUpstreams([FakeInstance("a", url), FakeInstance("b", url, model="n")]), [narrow, wide]
    )
    r = await client.get("/v1/models")
    assert r.status == 401 and (await r.json())["error"]["code"] == "missing_api_key"
    listed = await (await client.get("/v1/models", headers=bearer(narrow_s))).json()
    assert [m["id"] for m in listed["data"]] == ["m"]
    listed = await (await client.get("/v1/models", headers=bearer(wide_s))).json()
    assert sorted(m["id"] for m in listed["data"]) == ["m", "n"]
