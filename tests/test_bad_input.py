"""Bad input, property-based: whatever arrives (bytes, JSON of any shape, hostile names and
paths) gets a clear error or a valid value, never an exception out of a parser, a 5xx from
the agent, or a name that climbs out of its directory.

The parsers are tested directly with hypothesis; the HTTP surface with one real agent (and a
simulated vLLM behind it) fed hypothesis-generated bodies over real HTTP.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web
from helpers import TOKEN, AgentProcess, agent_toml, free_port, instance_toml, start_agent_sync
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.cluster.assignments import outside_roots
from agent.proxy.cache import cache_key
from agent.proxy.context import Head, parse_head
from gpufleet.keyspace import InvalidName, Keyspace, assigned_instance_name, check_model, check_name, decode_or_skip
from gpufleet.keyspace import records as R
from gpufleet.models import path_problems, validate_model

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


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    port = free_port()
    a = start_agent_sync(tmp, agent_toml(tmp, port, instance_toml("m", model="m")), port, ready_instances=1)
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
