"""The rest of the OpenAI surface (Responses, rerank and score, audio, images, Anthropic's
Messages): each route forwarded by model, byte for byte, authenticated and counted like chat,
every answer saying where it was served (``X-Gpufleet-Node`` / ``X-Gpufleet-Instance``).

In process (the fakes of test_proxy_inprocess.py and the key gate of test_key_enforcement.py),
then once end to end: a real agent in keys mode over the simulated vLLM server, driven by the
official ``openai`` SDK."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tracemalloc
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from helpers import AgentProcess, agent_toml, free_port, instance_toml, start_agent_sync
from prometheus_client import generate_latest
from test_key_enforcement import bearer, keyed_client, make_key  # noqa: F401  (keyed_client: a fixture)
from test_proxy_inprocess import (
    FakeInstance,
    FakeRoutes,
    FakeUpstreams,
    endpoint,
    proxy_client,  # noqa: F401  (a fixture)
    serve,  # noqa: F401  (a fixture)
    status,
)

from agent.proxy.context import FORM_ROUTES, JSON_ROUTES, Head, parse_head
from agent.proxy.multipart import FormError, form_fields
from gpufleet.facts import INSTANCE_HEADER, NODE_HEADER
from gpufleet.keyspace.records import RouteRecord
from gpufleet.tomlwrite import dumps as toml_dumps

NEW_JSON_ROUTES = [r for r in JSON_ROUTES if r not in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")]
BOUNDARY = "gpufleet-test-boundary"


def echo_bytes(name: str) -> Any:
    """A model server that says who it is, which path it got, and a digest of the exact body."""

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {
                "served_by": name,
                "path": request.path,
                "sha256": hashlib.sha256(body).hexdigest(),
                "content_type": request.headers.get("Content-Type"),
            }
        )

    return handle


def form(*parts: tuple[str, bytes, str | None], boundary: str = BOUNDARY, close: bool = True) -> bytes:
    """A multipart/form-data body: (field name, value, filename or None) per part."""
    out = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        kind = "Content-Type: audio/wav\r\n" if filename else ""
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n{kind}\r\n".encode() + value + b"\r\n"
    return out + (f"--{boundary}--\r\n".encode() if close else b"")


FORM_TYPE = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


def body_for(path: str, model: str) -> tuple[bytes, dict[str, str]]:
    if path in FORM_ROUTES:
        return form(("file", b"RIFF" + b"\0" * 64, "a.wav"), ("model", model.encode(), None)), FORM_TYPE
    return json.dumps({"model": model, "input": "hi"}).encode(), {"Content-Type": "application/json"}


# --- every route: routed by model, byte for byte, labelled ----------------------------------------------


@pytest.mark.parametrize("path", NEW_JSON_ROUTES + list(FORM_ROUTES))
async def test_each_route_is_routed_by_model_and_says_where(proxy_client: Any, serve: Any, path: str) -> None:  # noqa: F811
    a = FakeInstance("inst-a", await serve(echo_bytes("a")), model="ma")
    b = FakeInstance("inst-b", await serve(echo_bytes("b")), model="mb")
    client = await proxy_client(FakeUpstreams([a, b]))
    for model, name, inst in (("ma", "a", "inst-a"), ("mb", "b", "inst-b")):
        data, headers = body_for(path, model)
        r = await client.post(path, data=data, headers=headers)
        got = await r.json()
        assert r.status == 200 and got["served_by"] == name and got["path"] == path
        assert got["sha256"] == hashlib.sha256(data).hexdigest()  # the body went on as it came
        assert got["content_type"] == headers["Content-Type"]  # the form's boundary with it
        assert (r.headers[NODE_HEADER], r.headers[INSTANCE_HEADER]) == ("here", inst)

    data, headers = body_for(path, "nobody-serves-this")
    r = await client.post(path, data=data, headers=headers)
    assert r.status == 404 and r.headers[NODE_HEADER] == "here" and INSTANCE_HEADER not in r.headers
    assert client.proxy.stats.counters.attempts == 2


async def test_a_route_the_server_lacks_is_its_404_passed_on_not_a_failure(proxy_client: Any, serve: Any) -> None:  # noqa: F811
    # vLLM has no /v1/images/generations: FastAPI answers 404. The request's fault, not the
    # instance's: no retry on the other instance, nothing reported against either.
    first = FakeInstance("a", await serve(status(404, b'{"detail":"Not Found"}')))
    second = FakeInstance("b", await serve(status(404, b'{"detail":"Not Found"}')))
    client = await proxy_client(FakeUpstreams([first, second]))
    r = await client.post("/v1/images/generations", json={"model": "m", "prompt": "a cat"})
    assert r.status == 404 and await r.read() == b'{"detail":"Not Found"}'
    assert r.headers[INSTANCE_HEADER] in ("a", "b")
    assert not first.failures and not second.failures and client.proxy.stats.counters.attempts == 1


async def test_another_nodes_answer_keeps_the_serving_nodes_names(proxy_client: Any, serve: Any) -> None:  # noqa: F811
    async def labelled_node(request: web.Request) -> web.Response:
        return web.json_response({"ok": True}, headers={NODE_HEADER: "there", INSTANCE_HEADER: "x-real"})

    async def unlabelled_node(request: web.Request) -> web.Response:  # an agent from before the headers
        return web.json_response({"ok": True})

    async def refusing_node(request: web.Request) -> web.Response:  # its proxy refused: no instance served
        return web.json_response({"error": {"message": "no"}}, status=429, headers={NODE_HEADER: "there"})

    cases = ((labelled_node, ("there", "x-real")), (unlabelled_node, ("there", "x")), (refusing_node, ("there", None)))
    for handler, names in cases:
        address = await serve(handler)
        routes = FakeRoutes({"m": RouteRecord(model="m", epoch=1, updated_at=0.0, endpoints=[endpoint(address)])})
        client = await proxy_client(FakeUpstreams([], routes, max_attempts=1))
        r = await client.post("/v1/responses", json={"model": "m", "input": "hi"})
        assert (r.headers[NODE_HEADER], r.headers.get(INSTANCE_HEADER)) == names


# --- multipart: model and stream read in place ----------------------------------------------------------


def test_form_fields_are_found_without_copying_the_file() -> None:
    audio = os.urandom(24 * 2**20)  # a 24 MiB upload, the model after it
    body = form(("file", audio, "speech.wav"), ("model", b"whisper-large", None), ("stream", b"true", None))
    ct = f"multipart/form-data; boundary={BOUNDARY}"
    tracemalloc.start()
    try:
        head = parse_head(body, "/v1/audio/transcriptions", ct)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert head == Head("whisper-large", True)
    assert peak < 64 * 1024  # the 24 MiB file part was skipped over, never sliced


def test_form_field_edge_cases() -> None:
    ct = f'multipart/form-data; boundary="{BOUNDARY}"'  # a quoted boundary
    preamble = b"ignored preamble\r\n" + form(("model", b"m", None), ("model", b"second", None))
    assert form_fields(preamble, ct, frozenset({"model"})) == {"model": "m"}  # the first value counts
    # A file part named "model" is not the model field; an unnamed-parameter order is fine.
    body = form(("model", b"not-this", "model.txt"), ("model", b"this", None))
    assert form_fields(body, ct, frozenset({"model"})) == {"model": "this"}
    assert parse_head(form(("model", b"m", None)), "/v1/audio/translations", ct) == Head("m", False)


@pytest.mark.parametrize(
    ("body", "content_type", "says"),
    [
        (form(("model", b"m", None)), "application/json", "must be multipart/form-data"),
        (form(("model", b"m", None)), "multipart/form-data", "no valid multipart boundary"),
        (b"no boundary anywhere", None, "no multipart boundary line"),
        (form(("model", b"m", None), close=False), None, "without its closing boundary"),
        (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=model".encode(), None, "headers do not end"),
        (
            f"--{BOUNDARY}\r\nContent-Type: text/plain\r\n\r\nm\r\n--{BOUNDARY}--".encode(),
            None,
            "no Content-Disposition",
        ),
        (f"--{BOUNDARY}\r\nContent-Disposition: form-data\r\n\r\nm\r\n--{BOUNDARY}--".encode(), None, "no field name"),
        (form(("model", b"\xff\xfe", None)), None, "not valid UTF-8"),
        (form(("model", b"m" * 5000, None)), None, "longer than"),
    ],
)
def test_malformed_forms_are_refused(body: bytes, content_type: str | None, says: str) -> None:
    with pytest.raises(FormError, match=says):
        form_fields(body, content_type or FORM_TYPE["Content-Type"], frozenset({"model"}))


async def test_malformed_multipart_is_400_in_openai_shape(proxy_client: Any, serve: Any) -> None:  # noqa: F811
    client = await proxy_client(FakeUpstreams([FakeInstance("a", await serve(echo_bytes("a")))]))
    path = "/v1/audio/transcriptions"
    cases = [
        (form(("model", b"m", None), close=False), FORM_TYPE, "invalid_multipart"),
        (json.dumps({"model": "m"}).encode(), {"Content-Type": "application/json"}, "invalid_multipart"),
        (form(("file", b"RIFF", "a.wav")), FORM_TYPE, "missing_model"),
    ]
    for data, headers, code in cases:
        r = await client.post(path, data=data, headers=headers)
        doc = await r.json()
        assert r.status == 400 and doc["error"]["code"] == code and set(doc["error"]) == {"message", "type", "code"}
    assert client.proxy.stats.counters.attempts == 0


# --- Anthropic's Messages API ---------------------------------------------------------------------------


async def test_messages_refusals_are_in_anthropics_shape(keyed_client: Any, serve: Any) -> None:  # noqa: F811
    rec, secret = make_key("k", models=["m"])
    anthropic_404 = b'{"type":"error","error":{"type":"NotFoundError","message":"no"}}'
    inst = FakeInstance("a", await serve(status(404, anthropic_404)))
    client = await keyed_client(FakeUpstreams([inst]), [rec])
    msg = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    cases = [
        ({}, msg, 401, "authentication_error"),
        ({"x-api-key": "gpf_wrong"}, msg, 401, "authentication_error"),
        ({"x-api-key": secret}, {**msg, "model": "other"}, 403, "permission_error"),
        ({"x-api-key": secret}, {"messages": []}, 400, "invalid_request_error"),
    ]
    for headers, body, code, kind in cases:
        r = await client.post("/v1/messages", json=body, headers={"anthropic-version": "2023-06-01", **headers})
        doc = await r.json()
        assert r.status == code and doc["type"] == "error" and doc["error"]["type"] == kind, (headers, doc)
        assert doc["error"]["message"] and doc["request_id"] == r.headers["X-Request-ID"]
        assert r.headers[NODE_HEADER] == "here"
    # The server's own error, already in Anthropic's shape, passes byte for byte.
    r = await client.post("/v1/messages", json=msg, headers={"x-api-key": secret})
    assert r.status == 404 and await r.read() == anthropic_404 and r.headers[INSTANCE_HEADER] == "a"
    # The OpenAI routes keep OpenAI's shape.
    r = await client.post("/v1/responses", json={"model": "m", "input": "x"})
    assert r.status == 401 and "type" not in await r.json()


async def test_messages_usage_is_counted_per_key(keyed_client: Any, serve: Any) -> None:  # noqa: F811
    async def messages(request: web.Request) -> web.Response:
        usage = {"input_tokens": 11, "output_tokens": 7}
        return web.json_response({"type": "message", "content": [{"type": "text", "text": "hi"}], "usage": usage})

    rec, secret = make_key("k")
    client = await keyed_client(FakeUpstreams([FakeInstance("a", await serve(messages))]), [rec])
    msg = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    r = await client.post("/v1/messages", json=msg, headers={"x-api-key": secret})
    assert r.status == 200
    text = generate_latest(client.registry).decode()
    assert 'gpu_agent_key_tokens_total{key="k",kind="prompt",model="m"} 11.0' in text
    assert 'gpu_agent_key_tokens_total{key="k",kind="completion",model="m"} 7.0' in text


# --- end to end: a real agent in keys mode, the simulated vLLM, the openai SDK --------------------------------


@pytest.fixture(scope="module")
def keyed_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AgentProcess, str]]:
    tmp = tmp_path_factory.mktemp("surface")
    keys = tmp / "keys.json"
    made = subprocess.run(
        [sys.executable, "-m", "gpuctl", "keys", "create", "app", "--file", str(keys), "-o", "json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    port = free_port()
    text = agent_toml(tmp, port, instance_toml("sim-0", model="sim", args='["--tokens-per-second", "0"]'))
    text += "\n" + toml_dumps({"auth": {"mode": "keys", "keys_file": keys}})
    agent = start_agent_sync(tmp, text, port, ready_instances=1)
    yield agent, json.loads(made.stdout)["secret"]
    agent.stop()


def key_tokens(agent: AgentProcess, kind: str) -> float:
    with urllib.request.urlopen(agent.base + "/metrics", timeout=5) as r:
        lines = r.read().decode().splitlines()
    prefix = f'gpu_agent_key_tokens_total{{key="app",kind="{kind}",model="sim"}} '
    return sum(float(line[len(prefix) :]) for line in lines if line.startswith(prefix))


async def test_the_sdk_through_a_keyed_agent(keyed_agent: tuple[AgentProcess, str], tmp_path: Path) -> None:
    agent, secret = keyed_agent
    client = openai.AsyncOpenAI(base_url=agent.base + "/v1", api_key=secret, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await openai.AsyncOpenAI(base_url=agent.base + "/v1", api_key="gpf_nope", max_retries=0).responses.create(
            model="sim", input="hi"
        )

    before = key_tokens(agent, "completion")
    r = await client.responses.with_raw_response.create(model="sim", input="hello there", max_output_tokens=5)
    assert (r.headers[NODE_HEADER], r.headers[INSTANCE_HEADER]) == ("test-node", "sim-0")
    reply = r.parse()
    assert reply.usage is not None and reply.usage.output_tokens == 5 and len(reply.output_text.split()) == 5
    events = [e async for e in await client.responses.create(model="sim", input="hi", max_output_tokens=3, stream=True)]
    assert events[-1].type == "response.completed"
    assert key_tokens(agent, "completion") - before == 5 + 3  # both counted, the stream's from its last event

    # 4 MiB of audio: past aiohttp's default 1 MiB body limit, read once by the proxy.
    audio = b"RIFF" + os.urandom(4 * 2**20)
    t = await client.audio.transcriptions.create(model="sim", file=("a.wav", audio))
    assert t.text and t.usage is not None and t.usage.seconds == 132  # type: ignore[union-attr]
    stream = await client.audio.transcriptions.create(model="sim", file=("a.wav", audio), stream=True)
    assert [c async for c in stream]

    with pytest.raises(openai.NotFoundError):  # vLLM serves no images: its 404, passed on
        await client.images.generate(model="sim", prompt="a cat")
    with pytest.raises(openai.NotFoundError) as unknown:
        await client.images.generate(model="gpt-image-9", prompt="a cat")
    assert unknown.value.body["code"] == "model_not_found"  # type: ignore[index]

    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {secret}"}) as http:
        docs = {"model": "sim", "query": "a b", "documents": ["x y", "a b"]}
        async with http.post(agent.base + "/v1/rerank", json=docs) as resp:
            ranked = await resp.json()
            assert resp.status == 200 and ranked["results"][0]["index"] == 1
        async with http.post(
            agent.base + "/v1/score", json={"model": "sim", "text_1": "a", "text_2": ["a", "b"]}
        ) as resp:
            assert resp.status == 200 and len((await resp.json())["data"]) == 2

    before = key_tokens(agent, "prompt"), key_tokens(agent, "completion")
    msg = {"model": "sim", "max_tokens": 4, "messages": [{"role": "user", "content": "one two three"}]}
    async with aiohttp.ClientSession(headers={"x-api-key": secret, "anthropic-version": "2023-06-01"}) as http:
        async with http.post(agent.base + "/v1/messages", json=msg) as resp:
            doc = await resp.json()
            assert resp.status == 200 and doc["usage"] == {"input_tokens": 3, "output_tokens": 4}
        async with http.post(agent.base + "/v1/messages", json={**msg, "stream": True}) as resp:
            assert b"event: message_stop" in await resp.read()
        async with http.post(agent.base + "/v1/messages", json={**msg, "model": "nope"}) as resp:
            assert resp.status == 404 and (await resp.json())["error"]["type"] == "not_found_error"
    assert key_tokens(agent, "prompt") - before[0] == 3 + 3
    assert key_tokens(agent, "completion") - before[1] == 4 + 4
