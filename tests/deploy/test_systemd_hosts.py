"""ansible/deploy.yml on three booted Debian 12 hosts (systemd-nspawn), checked for real.

``gf-ctl`` runs etcd and a coordinator, ``gf-gpu-a`` and ``gf-gpu-b`` an agent each with a
simulated A100 and a simulated vLLM server. The hosts start bare (a minbase image with systemd,
sshd, python3 and python3-apt): the playbook installs everything else from a local apt repository and
wheelhouse. Then, from this machine: the units run and told systemd READY with a status line,
the OpenAI API answers through each agent, etcd holds the fleet (read with the playbook's client
certificate), ``gpuctl check`` passes from an agent host, a second run changes nothing; and
systemd's handling of the agent: reload keeps the model servers, SIGKILL and a watchdog timeout
restart it without orphans, stop leaves no model server, errors reach the journal at error
priority, and rebooted hosts come back with everything.

Run: ``sudo .venv/bin/pytest -q -m deploy tests/deploy`` (README: "Deployment tests on real
systemd hosts"). Each test leaves the fleet deployed and running for the next.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import time
import tomllib

import nspawn
import openai
import pytest
from conftest import AGENTS, CLUSTER, CONTROL, KEY_NAME, Deployment
from openai import OpenAI
from playbook import MODEL

from gpufleet.facts import HOP_AUTH_HEADER, HOPS_HEADER

pytestmark = [pytest.mark.deploy, pytest.mark.slow, pytest.mark.timeout(1800)]

UNITS = {CONTROL: ("etcd", "gpu-coordinator"), **{a: ("gpu-agent",) for a in AGENTS}}


def _no_orphans(d: Deployment, host: str) -> None:
    """Every model-server process in the container belongs to an instance the running agent
    supervises (a server that survived a restart counts when the new agent adopted it)."""
    orphans = d.orphans(host)
    assert not orphans, f"orphan model servers on {host}: {orphans} (agent has {d.instance_pids(host)})"


def test_first_run_deployed_every_host(deployment: Deployment) -> None:
    first = deployment.first
    assert set(first.hosts) == {CONTROL, *AGENTS}
    assert all(c["changed"] > 0 and c["failed"] == 0 for c in first.hosts.values()), first.hosts


def test_units_are_active_and_ready_with_a_status_line(deployment: Deployment) -> None:
    for host, units in UNITS.items():
        for unit in units:
            props = deployment.unit(host, unit)
            assert (props["ActiveState"], props["SubState"]) == ("active", "running"), (host, unit, props)
            if unit != "etcd":  # Debian's etcd.service is Type=notify too, but sends no STATUS=
                # Type=notify: active means READY=1 arrived; STATUS= is the daemon's own line.
                assert props["StatusText"].strip(), (host, unit, props)
                assert props["NRestarts"] == "0", (host, unit, props)
                assert props["WatchdogUSec"] not in ("0", "infinity"), (host, unit, props)
        # Nothing failed on the host (a 216/GROUP restart loop would show here).
        state = deployment.ssh(host, "systemctl is-system-running", check=False).stdout.strip()
        failed = deployment.ssh(host, "systemctl --failed --no-legend --plain").stdout
        assert state == "running" and not failed.strip(), (host, state, failed)
    for host in AGENTS:
        # The state and log directories keep the role's 0750 across starts (StateDirectoryMode).
        modes = deployment.ssh(host, "stat -c '%n %a %U:%G' /var/lib/gpu-agent /var/log/gpu-agent /etc/gpu-agent")
        assert modes.stdout.split("\n")[:3] == [
            "/var/lib/gpu-agent 750 gpu-agent:gpu-agent",
            "/var/log/gpu-agent 750 gpu-agent:gpu-agent",
            "/etc/gpu-agent 750 root:gpu-agent",
        ], modes.stdout
        groups = deployment.ssh(host, "id -nG gpu-agent").stdout.split()
        assert {"video", "render"} <= set(groups), groups


def test_openai_chat_and_streaming_through_each_agent(deployment: Deployment) -> None:
    for host in AGENTS:
        client = OpenAI(
            base_url=deployment.agent_url(host) + "/v1", api_key=deployment.api_key, timeout=30, max_retries=0
        )
        assert MODEL in [m.id for m in client.models.list()]
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Say hi"}], max_tokens=8
        )
        assert reply.choices[0].message.content, reply
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Count"}], max_tokens=12, stream=True
        )
        chunks = [c for c in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert len(chunks) > 2 and text, chunks
        assert chunks[-1].choices[0].finish_reason or chunks[-2].choices[0].finish_reason


def _openai_error(code: int, body: object, status: int) -> dict:
    """The ``error`` object of an answer in OpenAI's error shape, after checking the status."""
    assert code == status, (code, body)
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    error = body["error"]
    assert isinstance(error.get("message"), str) and error["message"], body
    assert isinstance(error.get("type"), str) and "code" in error, body
    return error


def test_requests_without_a_valid_key_are_refused_with_401(deployment: Deployment) -> None:
    key = deployment.api_key
    for host in AGENTS:
        # No key, a wrong key: 401 in OpenAI's error shape, which the SDK raises as such.
        _openai_error(*deployment.chat(host, None), 401)
        _openai_error(*deployment.chat(host, "gfk-" + "0" * 40), 401)
        client = OpenAI(base_url=deployment.agent_url(host) + "/v1", api_key="sk-wrong", timeout=30, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        # A hop header from outside the cluster, with a made-up signature and no key: a peer's
        # forward is believed only with a signature made with the cluster's hop secret.
        forged = {HOPS_HEADER: "1", HOP_AUTH_HEADER: f"v1 {int(time.time())} {'ab' * 32}"}
        _openai_error(*deployment.chat(host, None, headers=forged), 401)
        # The key itself still works (also through x-api-key, as Anthropic's clients send it).
        assert deployment.chat(host, key)[0] == 200
        code, body = deployment.chat(host, None, headers={"x-api-key": key})
        assert code == 200, body
    # The key is the cluster's (etcd): listed by name, no secret anywhere in the listing.
    listing = deployment.gpuctl(CONTROL, "keys list").stdout
    assert KEY_NAME in listing and key not in listing, listing


def test_the_hop_secret_is_the_same_private_file_on_every_agent(deployment: Deployment) -> None:
    made = (deployment.workdir / "pki" / "hop-secret").read_bytes()
    assert len(made.strip()) >= 32
    for host in AGENTS:
        st = deployment.ssh(host, "stat -c '%U:%G %a' /etc/gpu-agent/hop-secret").stdout.strip()
        assert st == "root:gpu-agent 640", (host, st)
        on_host = deployment.ssh(host, "sha256sum /etc/gpu-agent/hop-secret").stdout.split()[0]
        assert on_host == hashlib.sha256(made).hexdigest(), host
        cfg = tomllib.loads(deployment.ssh(host, "cat /etc/gpu-agent/agent.toml").stdout)
        assert cfg["auth"] == {"mode": "keys", "hop_secret_file": "/etc/gpu-agent/hop-secret"}, cfg["auth"]


def test_a_request_forwarded_between_agents_is_served(deployment: Deployment) -> None:
    """Drained, the entry agent sends its requests to the other one (signed with the hop
    secret): the client's key is checked once, at the entry, and the request is answered."""
    entry, other = AGENTS
    key = deployment.api_key
    served_there = lambda: deployment.metric(other, "gpu_agent_proxy_requests_total", model=MODEL, code="200")  # noqa: E731
    deployment.gpuctl(CONTROL, f"drain {entry} --reason tests/deploy")
    try:
        nspawn.wait_for(
            lambda: deployment.agent_status(entry).get("cluster", {}).get("drained") is True, 30, f"{entry} drained"
        )
        before = served_there()
        client = OpenAI(base_url=deployment.agent_url(entry) + "/v1", api_key=key, timeout=30, max_retries=0)
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert reply.choices[0].message.content, reply
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Count"}], max_tokens=8, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        # Both were answered by the other agent's proxy, which took the forwarded requests (it
        # counts a stream once it has sent the end, which may be just after the client read it).
        nspawn.wait_for(lambda: served_there() == before + 2, 10, f"2 forwarded requests answered by {other}")
        # Without a key the entry refuses it before forwarding anything.
        _openai_error(*deployment.chat(entry, None), 401)
        assert served_there() == before + 2
    finally:
        deployment.gpuctl(CONTROL, f"undrain {entry}")
    nspawn.wait_for(
        lambda: deployment.agent_status(entry).get("cluster", {}).get("drained") is False, 30, f"{entry} undrained"
    )


def test_etcd_holds_the_fleet_readable_with_the_client_certificate(deployment: Deployment) -> None:
    prefix = f"/gpufleet/{CLUSTER}/"
    want = {f"{prefix}nodes/{a}" for a in AGENTS} | {f"{prefix}leader", f"{prefix}routes/{MODEL}"}
    keys = nspawn.wait_for(
        lambda: (k := set(deployment.etcd_keys())) >= want and k, 60, "node records, leader and routes in etcd"
    )
    node = json.loads(deployment.etcdctl("get", "--print-value-only", f"{prefix}nodes/{AGENTS[0]}").stdout)
    assert node["node"] == AGENTS[0] and node["address"] == deployment.agent_url(AGENTS[0]), node
    assert all(k.startswith("/gpufleet/") for k in keys)
    # Without the client certificate etcd does not talk to us at all.
    pki = deployment.workdir / "pki"
    bare = nspawn.run(
        [
            "etcdctl",
            f"--endpoints=https://{deployment.address(CONTROL)}:2379",
            f"--cacert={pki / 'ca.pem'}",
            "--command-timeout=3s",
            "get",
            "--prefix",
            "/gpufleet/",
        ],
        check=False,
        timeout=30,
    )
    assert bare.returncode != 0


def test_gpuctl_check_passes_from_an_agent_host(deployment: Deployment) -> None:
    # The leader's advertised URL must be reachable from another host (it was http://<id>:8090).
    leader = json.loads(deployment.etcdctl("get", "--print-value-only", f"/gpufleet/{CLUSTER}/leader").stdout or "{}")
    assert leader.get("address") == deployment.coordinator_url(), leader
    # The coordinator keeps the highest epoch it has seen in its StateDirectory= (epochs must
    # keep growing after etcd is restored from a backup while the coordinators restart too).
    recorded = deployment.ssh(CONTROL, "cat /var/lib/gpu-coordinator/epoch").stdout.strip()
    assert int(recorded) >= leader["epoch"] > 0, (recorded, leader)
    out = nspawn.wait_for(
        lambda: _check_output(deployment), 90, "gpuctl check passing (routes with 2 READY endpoints)", interval=2
    )
    assert "FAIL" not in out, out


def _check_output(d: Deployment) -> str | None:
    res = d.gpuctl(AGENTS[0], "check", check=False)
    return res.stdout if res.returncode == 0 else None


def test_second_run_changes_nothing(deployment: Deployment) -> None:
    recap = deployment.play(label="second deploy")
    assert recap.changed() == dict.fromkeys([CONTROL, *AGENTS], 0), "\n".join(recap.changed_tasks())
    for host in AGENTS:
        assert deployment.unit(host, "gpu-agent")["NRestarts"] == "0"


def test_reload_keeps_the_model_servers(deployment: Deployment) -> None:
    host = AGENTS[0]
    before = deployment.unit(host, "gpu-agent")
    pids = deployment.instance_pids(host)
    servers = set(deployment.model_servers(host))
    assert pids and pids <= servers and not deployment.orphans(host)
    cursor = deployment.journal_cursor(host)
    deployment.ssh(host, "systemctl reload gpu-agent")
    nspawn.wait_for(
        lambda: _with(deployment.journal(host, "gpu-agent", cursor), "config reloaded"),
        30,
        "'config reloaded' in the agent's journal",
    )
    after = deployment.unit(host, "gpu-agent")
    assert after["MainPID"] == before["MainPID"] and after["NRestarts"] == before["NRestarts"]
    assert deployment.instance_pids(host) == pids
    assert set(deployment.model_servers(host)) == servers
    deployment.wait_agent_ready(host)


def test_errors_reach_the_journal_at_error_priority(deployment: Deployment) -> None:
    host = AGENTS[1]
    cfg = "/etc/gpu-agent/agent.toml"
    cursor = deployment.journal_cursor(host)
    since = int(deployment.clock(host))
    # A broken config on reload: the agent logs each problem as an error and keeps running.
    deployment.ssh(host, f"cp -p {cfg} {cfg}.good && printf '[agent]\\nlisten_port = \"x\"\\n' >> {cfg}")
    try:
        deployment.ssh(host, "systemctl reload gpu-agent")
        # journald files the line when it reads the stream: wait for it, do not just look once.
        entries = nspawn.wait_for(
            lambda: _with(deployment.journal(host, "gpu-agent", cursor), "reload refused"),
            30,
            "'reload refused' in the agent's journal",
        )
    finally:
        deployment.ssh(host, f"mv -f {cfg}.good {cfg}")
    assert deployment.unit(host, "gpu-agent")["ActiveState"] == "active"
    # Each entry is filed at its level's priority: errors at 3 (err), info at 6.
    mine = [e for e in entries if e.get("MESSAGE", "").startswith("{")]
    levels = {(json.loads(e["MESSAGE"])["level"], e["PRIORITY"]) for e in mine}
    assert ("error", "3") in levels and levels <= {("error", "3"), ("warning", "4"), ("info", "6"), ("debug", "7")}
    # What an operator types shows it, and nothing of the agent's info chatter.
    shown = deployment.ssh(host, f"journalctl -u gpu-agent -p err --since=@{since} -o cat --no-pager").stdout
    assert "reload refused" in shown and '"level":"info"' not in shown, shown
    # Back to the deployed config: the reload applies it again.
    cursor = deployment.journal_cursor(host)
    deployment.ssh(host, "systemctl reload gpu-agent")
    nspawn.wait_for(
        lambda: _with(deployment.journal(host, "gpu-agent", cursor), "config reloaded"),
        30,
        "'config reloaded' after restoring the config",
    )
    deployment.wait_agent_ready(host)


def _with(entries: list[dict], text: str) -> list[dict] | None:
    """The journal entries when one of them says ``text``, else None (keep waiting)."""
    return entries if any(text in e.get("MESSAGE", "") for e in entries) else None


def test_sigkill_of_the_agent_restarts_it_without_orphans(deployment: Deployment) -> None:
    host = AGENTS[0]
    before = deployment.unit(host, "gpu-agent")
    deployment.ssh(host, f"kill -9 {before['MainPID']}")

    def restarted() -> dict[str, str] | None:
        u = deployment.unit(host, "gpu-agent")
        restarted = u["MainPID"] not in ("0", before["MainPID"]) and int(u["NRestarts"]) > int(before["NRestarts"])
        return u if restarted and u["ActiveState"] == "active" else None

    nspawn.wait_for(restarted, 60, "gpu-agent restarted by systemd")
    deployment.wait_agent_ready(host)
    _no_orphans(deployment, host)


def test_stop_leaves_no_model_server(deployment: Deployment) -> None:
    host = AGENTS[1]
    assert deployment.model_servers(host)
    deployment.ssh(host, "systemctl stop gpu-agent", timeout=120)
    try:
        assert deployment.unit(host, "gpu-agent")["ActiveState"] == "inactive"
        # Gone at once, or within the stop grace of whatever keeps a server across restarts.
        nspawn.wait_for(lambda: not deployment.model_servers(host), 60, "no model server after stop", interval=0.5)
    finally:
        deployment.ssh(host, "systemctl start gpu-agent", timeout=120)
    deployment.wait_agent_ready(host)
    _no_orphans(deployment, host)


def test_a_frozen_agent_is_restarted_by_the_watchdog(deployment: Deployment) -> None:
    host = AGENTS[1]
    before = deployment.unit(host, "gpu-agent")
    watchdog_s = int(before["WatchdogUSec"].rstrip("s")) if before["WatchdogUSec"].endswith("s") else None
    cursor = deployment.journal_cursor(host)
    t0 = time.monotonic()
    deployment.ssh(host, f"kill -STOP {before['MainPID']}")

    def restarted() -> bool:
        u = deployment.unit(host, "gpu-agent")
        return u["MainPID"] not in ("0", before["MainPID"]) and u["ActiveState"] == "active"

    nspawn.wait_for(restarted, 120, "the watchdog to restart the frozen agent", interval=1)
    took = time.monotonic() - t0
    systemd_says = deployment.ssh(host, f"journalctl -u gpu-agent --after-cursor={shlex.quote(cursor)} -o cat").stdout
    assert "Watchdog timeout" in systemd_says, systemd_says[-3000:]
    if watchdog_s is not None:
        assert took >= watchdog_s * 0.9
    deployment.wait_agent_ready(host)
    _no_orphans(deployment, host)


def test_a_rebooted_agent_host_comes_back(deployment: Deployment) -> None:
    host = AGENTS[1]
    deployment.fleet.reboot(host)
    deployment.wait_agent_ready(host, timeout=180)
    assert deployment.unit(host, "gpu-agent")["NRestarts"] == "0"  # a fresh boot, first start
    nspawn.wait_for(
        lambda: f"/gpufleet/{CLUSTER}/nodes/{host}" in deployment.etcd_keys(), 60, f"{host} registered again"
    )
    _no_orphans(deployment, host)


def test_a_rebooted_control_host_comes_back(deployment: Deployment) -> None:
    deployment.fleet.reboot(CONTROL)
    for unit in UNITS[CONTROL]:
        nspawn.wait_for(
            lambda u=unit: deployment.unit(CONTROL, u)["ActiveState"] == "active", 120, f"{unit} active after reboot"
        )
    nspawn.wait_for(
        lambda: deployment.http_json(deployment.coordinator_url() + "/readyz")[0] == 200, 120, "coordinator ready"
    )
    # Agents kept serving throughout and are registered again; the checklist passes.
    out = nspawn.wait_for(lambda: _check_output(deployment), 120, "gpuctl check passing after reboot", interval=2)
    assert "FAIL" not in out
