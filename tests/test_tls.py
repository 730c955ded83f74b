"""TLS end to end, with certificates made here (gpufleet_dev/localtls.py): real agents and a real
coordinator serving HTTPS, the official ``openai`` SDK verifying the test CA, two cluster agents
forwarding to each other over mutual TLS, clients without the CA (or without a client
certificate) refused, a certificate rotated by SIGHUP, a bad key refused at start-up (78, the
field named), and ``[api] status_access = "token"`` guarding /v1/status and /metrics."""

from __future__ import annotations

import json
import shutil
import signal
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest
from etcd_fixtures import EtcdCluster
from helpers import (
    TOKEN,
    AgentProcess,
    CoordinatorProcess,
    agent_toml,
    as_node,
    cluster_toml,
    free_port,
    pid_alive,
    wait_until,
)

from gpufleet.facts import EX_CONFIG
from gpufleet.tomlwrite import dumps as toml_dumps
from gpufleet_dev.fleetbase import wait_for
from gpufleet_dev.fleetconfig import coordinator_doc, instance_toml
from gpufleet_dev.localtls import TlsFiles, make_tls

CLUSTER = "tls-e2e"
STATUS_TOKEN = "status-token-0123456789"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def client_context(ca: str | None, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca)
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


def call(url: str, ctx: ssl.SSLContext, token: str | None = None, body: object = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = None
    if body is not None:
        data, headers = json.dumps(body).encode(), {**headers, "Content-Type": "application/json"}
    req = urllib.request.Request(url, data, headers)
    try:
        with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def status_json(base: str, ctx: ssl.SSLContext) -> dict[str, Any]:
    with urllib.request.urlopen(base + "/v1/status", timeout=5, context=ctx) as r:
        return json.loads(r.read())


def sdk(base: str, ctx: ssl.SSLContext) -> openai.OpenAI:
    """The official SDK, its HTTP client verifying with ``ctx`` (the test CA)."""
    http = openai.DefaultHttpxClient(verify=ctx)
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, http_client=http)


def tls_section(pki: TlsFiles, mutual: bool = False) -> str:
    tls = {"cert_file": pki.server_cert, "key_file": pki.server_key, "ca_file": pki.ca}
    if mutual:
        tls["client_ca_file"] = pki.ca
    return "\n" + toml_dumps({"tls": tls}) + "\n"


def start_https_agent(tmp: Path, text: str, port: int, ctx: ssl.SSLContext) -> AgentProcess:
    agent = AgentProcess(tmp, text, port)
    agent.base = f"https://127.0.0.1:{port}"
    agent.start()
    wait_for(lambda: call(agent.base + "/readyz", ctx) == 200, 60, f"{tmp.name} ready over https", [agent])
    return agent


def gpuctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gpuctl", *args], capture_output=True, text=True, timeout=60)


async def test_an_agent_over_https(tmp_path: Path) -> None:
    pki = make_tls(tmp_path / "pki")
    trusted = client_context(pki.ca)
    token_file = tmp_path / "status-token"
    token_file.write_text(STATUS_TOKEN + "\n")
    token_file.chmod(0o600)
    port = free_port()
    text = agent_toml(tmp_path, port, instance_toml("m-0", model="m", gpus="[0]", fraction=0.5))
    text += tls_section(pki)
    text += "\n" + toml_dumps({"api": {"status_access": "token", "status_token_file": token_file}})
    agent = start_https_agent(tmp_path, text, port, trusted)
    try:
        wait_for(lambda: call(agent.base + "/v1/chat/completions", trusted, body=CHAT) == 200, 60, "m READY")
        sdk = openai.OpenAI(
            base_url=agent.base + "/v1",
            api_key="unused",
            max_retries=0,
            http_client=openai.DefaultHttpxClient(verify=trusted),
        )
        reply = sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert reply.choices[0].message.content
        # A client that does not trust the cluster's CA (the SDK's default store) is refused.
        with pytest.raises(openai.APIConnectionError):
            openai.OpenAI(base_url=agent.base + "/v1", api_key="unused", max_retries=0).models.list()
        with pytest.raises(OSError):  # plain HTTP on the HTTPS port: no answer
            call(f"http://127.0.0.1:{port}/healthz", trusted)

        # /v1/status and /metrics need the status token (or the admin token); /healthz does not.
        assert call(agent.base + "/v1/status", trusted) == 401
        assert call(agent.base + "/metrics", trusted) == 401
        assert call(agent.base + "/v1/status", trusted, STATUS_TOKEN) == 200
        assert call(agent.base + "/metrics", trusted, TOKEN) == 200
        assert call(agent.base + "/v1/status", trusted, "wrong-token-0123456789") == 401
        assert call(agent.base + "/healthz", trusted) == 200

        ok = gpuctl("status", "--agent", agent.base, "--cacert", pki.ca, "--token-file", str(token_file), "-o", "json")
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["address"].startswith("https://")  # the default advertise_url follows [tls]
        assert gpuctl("status", "--agent", agent.base, "--token-file", str(token_file)).returncode == 2  # no CA
        unauthorized = gpuctl("status", "--agent", agent.base, "--cacert", pki.ca)
        assert unauthorized.returncode == 1 and "401" in unauthorized.stderr

        # Rotation: a certificate from another CA written over the files, then SIGHUP: new
        # connections get it, with no restart (same pid) and no refused connection.
        rotated = make_tls(tmp_path / "pki2")
        shutil.copyfile(rotated.server_cert, pki.server_cert)
        shutil.copyfile(rotated.server_key, pki.server_key)
        pid = agent.pid
        agent.send(signal.SIGHUP)
        new_ca = client_context(rotated.ca)
        await wait_until(lambda: call(agent.base + "/healthz", new_ca) == 200, 10, what="the rotated certificate")
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            call(agent.base + "/healthz", trusted)
        assert agent.pid == pid and agent.running()
    finally:
        agent.stop()


def run_daemon(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=60)


def test_a_bad_certificate_stops_the_start(tmp_path: Path) -> None:
    pki = make_tls(tmp_path / "pki")
    port = free_port()
    text = agent_toml(tmp_path, port, "")
    # The key of another certificate: check-config and the start both name tls.key_file.
    wrong_key = text + "\n" + toml_dumps({"tls": {"cert_file": pki.server_cert, "key_file": pki.client_key}})
    config = tmp_path / "agent.toml"
    config.write_text(wrong_key)
    checked = run_daemon("agent", "check-config", str(config))
    assert checked.returncode == EX_CONFIG and "$.tls.key_file" in checked.stderr, checked.stderr
    started = run_daemon("agent", "--config", str(config))
    assert started.returncode == EX_CONFIG
    assert "$.tls.key_file" in started.stdout + started.stderr and "is not the key" in started.stdout + started.stderr

    # The right key, readable by everyone: valid, with a warning naming the field.
    Path(pki.server_key).chmod(0o644)
    config.write_text(text + "\n" + toml_dumps({"tls": {"cert_file": pki.server_cert, "key_file": pki.server_key}}))
    checked = run_daemon("agent", "check-config", str(config))
    assert checked.returncode == 0 and "warning: $.tls.key_file" in checked.stderr, checked.stderr

    # The coordinator: a certificate file that is not there; status_access "token" without a token.
    doc = coordinator_doc("c1", port, ["http://127.0.0.1:1"], CLUSTER)
    doc["coordinator"]["advertise_url"] = f"https://127.0.0.1:{port}"
    doc["tls"] = {"cert_file": str(tmp_path / "missing.pem"), "key_file": pki.server_key}
    coordinator = tmp_path / "coordinator.toml"
    coordinator.write_text(toml_dumps(doc))
    checked = run_daemon("coordinator", "check-config", str(coordinator))
    assert checked.returncode == EX_CONFIG and "$.tls.cert_file" in checked.stderr, checked.stderr
    started = run_daemon("coordinator", "--config", str(coordinator))
    assert started.returncode == EX_CONFIG and "$.tls.cert_file" in started.stdout + started.stderr
    doc["tls"] = {}
    doc["api"] = {"status_access": "token"}
    coordinator.write_text(toml_dumps(doc))
    checked = run_daemon("coordinator", "check-config", str(coordinator))
    assert checked.returncode == EX_CONFIG and "$.api.status_access" in checked.stderr, checked.stderr


def cluster_agent(
    tmp: Path, node: str, etcd: EtcdCluster, pki: TlsFiles, model: str, ctx: ssl.SSLContext
) -> AgentProcess:
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    text = agent_toml(tmp, port, instance_toml(f"{model}-0", model=model, gpus="[0]", fraction=0.5))
    text = as_node(text, node, f"https://127.0.0.1:{port}")
    text += cluster_toml(etcd.endpoints, CLUSTER) + tls_section(pki, mutual=True)
    return start_https_agent(tmp, text, port, ctx)


async def test_agents_forward_to_each_other_over_mutual_tls(etcd: EtcdCluster, tmp_path: Path) -> None:
    """Agent b has no instance of m: it forwards to a, verifying a's certificate with the cluster's
    CA and presenting its own (a asks every client for one)."""
    pki = make_tls(tmp_path / "pki")
    member = client_context(pki.ca, pki.client_cert, pki.client_key)
    a = cluster_agent(tmp_path / "a", "a", etcd, pki, "m", member)
    b = cluster_agent(tmp_path / "b", "b", etcd, pki, "other", member)
    port = free_port()
    doc = coordinator_doc("c1", port, etcd.endpoints, CLUSTER)
    doc["coordinator"]["advertise_url"] = f"https://127.0.0.1:{port}"
    doc["tls"] = {"cert_file": pki.server_cert, "key_file": pki.server_key, "client_ca_file": pki.ca}
    coordinator = CoordinatorProcess(tmp_path, "c1", [], CLUSTER, port=port, config_text=toml_dumps(doc)).start()
    try:
        wait_for(lambda: call(f"https://127.0.0.1:{port}/readyz", member) == 200, 30, "coordinator", [coordinator])
        await wait_until(lambda: call(b.base + "/v1/chat/completions", member, body=CHAT) == 200, 30, what="b forwards")
        sdk = openai.OpenAI(
            base_url=b.base + "/v1",
            api_key="unused",
            max_retries=0,
            http_client=openai.DefaultHttpxClient(verify=member),
        )
        reply = sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert reply.choices[0].message.content

        # Without a client certificate, or with one another CA signed: no answer at all.
        for stranger in (
            client_context(pki.ca),
            client_context(pki.ca, pki.other_client_cert, pki.other_client_key),
        ):
            for base in (a.base, b.base, coordinator.base.replace("http://", "https://")):
                with pytest.raises(OSError):
                    call(base + "/healthz", stranger)

        # gpuctl check reaches the leader and both agents over mutual TLS with --cacert/--cert/--key.
        check = gpuctl(
            "--etcd", ",".join(etcd.endpoints), "--cluster", CLUSTER, "--cacert", pki.ca,
            "--cert", pki.client_cert, "--key", pki.client_key, "check", "-o", "json",
        )  # fmt: skip
        results = {r["name"]: r for r in json.loads(check.stdout)}
        assert results["the leader's /readyz and /metrics answer"]["status"] == "PASS", results
        assert results["agents' /metrics answer"]["status"] == "PASS", results
    finally:
        coordinator.stop()
        a.stop()
        b.stop()


async def test_the_handover_keeps_serving_https(tmp_path: Path) -> None:
    """The listening socket passed through systemd's fd store (tests/test_handover.py's fake) is
    served with TLS by the next agent: clients meet the same certificate across the restart."""
    from test_handover import FakeFdStore, _start_with_fds

    pki = make_tls(tmp_path / "pki")
    trusted = client_context(pki.ca)
    store = FakeFdStore(tmp_path / "notify")
    port = free_port()
    text = agent_toml(tmp_path, port, instance_toml("a")) + tls_section(pki)
    env = {"NOTIFY_SOCKET": str(store.path)}
    body = {"model": "a-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    first = AgentProcess(tmp_path, text, port, env=env)
    first.base = f"https://127.0.0.1:{port}"
    first.start()
    second = AgentProcess(tmp_path, text, port, env=env)
    second.base = first.base
    servers: list[int] = []
    try:
        wait_for(lambda: call(first.base + "/v1/chat/completions", trusted, body=body) == 200, 60, "a", [first])
        servers = [i["pid"] for i in status_json(first.base, trusted)["instances"]]
        await wait_until(lambda: "api" in store.names(), 10, what="the API socket stored")
        first.stop()
        second.env["PASS_FDS"] = store.passing()
        _start_with_fds(second, [int(p.split("=")[1]) for p in store.passing().split(",")])
        wait_for(lambda: call(second.base + "/v1/chat/completions", trusted, body=body) == 200, 30, "b", [second])
        assert any("serving on the socket the previous agent handed over" in ln for ln in second.log_lines())
    finally:
        second.stop()
        first.stop()
        store.flush()  # the unit stops for good: the shims take the servers down
        await wait_until(lambda: not any(pid_alive(p) for p in servers), 20, what="servers stopped")
        store.close()


@pytest.mark.parametrize(
    ("allow", "status"), [(["10.0.0.0/8"], 403), (["127.0.0.0/8"], 200), (["::1/128", "127.0.0.1/32"], 200)]
)
async def test_status_allow_lists_networks(aiohttp_client: Any, allow: list[str], status: int) -> None:
    from aiohttp import web

    from gpufleet.httpserver import ApiSection
    from gpufleet.statusaccess import StatusAccess

    access = StatusAccess(ApiSection(status_allow=allow), "test")
    app = web.Application(middlewares=[access.middleware])

    async def empty(_: web.Request) -> web.Response:
        return web.json_response({})

    for path in ("/v1/status", "/metrics", "/healthz"):
        app.router.add_get(path, empty)
    client = await aiohttp_client(app)
    assert (await client.get("/v1/status")).status == status
    assert (await client.get("/metrics")).status == status
    assert (await client.get("/healthz")).status == 200  # load balancers' probes stay open


def test_only_the_configured_ca_is_trusted(tmp_path: Path) -> None:
    """Under mutual TLS only client_ca_file signs clients, and with ca_file only the cluster's CA
    signs other nodes: the system's public CAs are not loaded beside them."""
    from gpufleet.tlsconfig import TlsSection, peer_context, server_context

    pki = make_tls(tmp_path / "pki")
    tls = TlsSection(cert_file=pki.server_cert, key_file=pki.server_key, client_ca_file=pki.ca, ca_file=pki.ca)
    server = server_context(tls)
    assert server.verify_mode == ssl.CERT_REQUIRED and server.cert_store_stats()["x509_ca"] == 1
    assert server.minimum_version == ssl.TLSVersion.TLSv1_2
    tls12 = {c["name"] for c in server.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert tls12 and all("GCM" in c or "CHACHA20" in c for c in tls12) and all("ECDHE" in c for c in tls12)
    peer = peer_context(tls)
    assert peer.check_hostname and peer.verify_mode == ssl.CERT_REQUIRED
    assert peer.cert_store_stats()["x509_ca"] == 1
