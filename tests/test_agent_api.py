"""The agent API's admin middleware, in process (pytest-aiohttp's ``aiohttp_client``) over a
stand-in runtime: which requests it stops and how, and that everything else passes it. The
process tests (test_agent_supervision.py, test_bad_input.py) cover the same answers end to end."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from agent.api.server import build_app
from gpufleet.httpserver import ApiSection

AUTH = {"Authorization": "Bearer right-token"}


class FakeToken:
    def __init__(self, configured: bool) -> None:
        self.configured = configured

    def check(self, authorization: str | None) -> bool:
        return self.configured and authorization == AUTH["Authorization"]


def runtime(configured: bool) -> Any:
    reloads: list[int] = []

    async def reload() -> Any:
        reloads.append(1)
        return SimpleNamespace(body={"applied": True}, http_status=200)

    return SimpleNamespace(
        cfg=SimpleNamespace(proxy=SimpleNamespace(enabled=False, max_body_bytes=1 << 20), api=ApiSection()),
        node_record=lambda: None,
        supervisor=SimpleNamespace(instances={}),
        publisher=None,
        admin_token=FakeToken(configured),
        reload=reload,
        reloads=reloads,
    )


@pytest.mark.parametrize(
    "path", ["/admin/reload", "/admin/instances/any/restart", "/admin/instances/any/bogus", "/admin/gpus/0"]
)
async def test_every_admin_route_needs_the_token(aiohttp_client: Any, path: str) -> None:
    client = await aiohttp_client(build_app(runtime(configured=True)))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic cmlnaHQtdG9rZW4="}):
        r = await client.post(path, headers=headers, json={})
        body = await r.json()
        assert r.status == 401, (path, headers)
        assert body["error"]["type"] == "authentication_error" and body["error"]["code"] == "unauthorized"
        assert r.headers["WWW-Authenticate"] == 'Bearer realm="gpu-agent"'


async def test_admin_routes_refused_without_a_token_file(aiohttp_client: Any) -> None:
    rt = runtime(configured=False)
    client = await aiohttp_client(build_app(rt))
    r = await client.post("/admin/reload", headers=AUTH)
    assert r.status == 403 and (await r.json())["error"]["code"] == "admin_disabled"
    assert rt.reloads == []


async def test_the_right_token_reaches_the_handler(aiohttp_client: Any) -> None:
    rt = runtime(configured=True)
    client = await aiohttp_client(build_app(rt))
    r = await client.post("/admin/reload", headers=AUTH)
    assert r.status == 200 and await r.json() == {"applied": True} and rt.reloads == [1]
    r = await client.post("/admin/instances/any/bogus", headers=AUTH)
    assert r.status == 404 and "unknown action" in (await r.json())["error"]["message"]


async def test_other_requests_pass_the_admin_check(aiohttp_client: Any) -> None:
    """No route, or no such method on an admin route: aiohttp's 404/405 (as JSON), not 401."""
    client = await aiohttp_client(build_app(runtime(configured=True)))
    r = await client.get("/admin/reload")
    assert r.status == 405 and (await r.json())["error"]["type"] == "invalid_request_error"
    r = await client.post("/admin/nothing-here")
    assert r.status == 404
