"""A rolling upgrade of the agents under steady traffic: no request fails, no model server restarts.

The playbook is run again with a wheel of a new version. Its agent play restarts one host at a
time (``serial: 1``) and waits for ``/readyz`` before the next. Meanwhile clients send chat
completions through both agents the whole time, so each restart happens while requests enter
at the restarting node itself and are forwarded to it from the other one.

What makes it work (docs/architecture.md, "No orphans, and restarts that keep the servers"):
the old agent leaves its model servers to the next one through systemd's fd store (lifelines,
output pipes) and hands over its listening socket, so connections arriving during the restart
wait in its backlog; it leaves its etcd lease for the next agent to take over, so the node never
leaves the routes. No drain is needed for zero failures: a drain would only move load away.

Checked: every request answered 200; every model server has the PID it had before; every agent
runs a new process reporting the new version; no orphan; the systemd units never failed.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
from conftest import AGENTS, Deployment
from openai import OpenAI
from playbook import MODEL

pytestmark = [pytest.mark.deploy, pytest.mark.slow, pytest.mark.timeout(1800)]

NEW_VERSION = "0.1.1.dev1"


class Traffic:
    """One client loop per entry node, each request a short chat completion, until stopped."""

    def __init__(self, d: Deployment) -> None:
        self.d = d
        self.key = d.api_key  # made here, once, not by the client threads at the same time
        self.stop = threading.Event()
        self.ok: Counter[str] = Counter()
        self.failures: list[tuple[str, float, str]] = []
        self.threads = [threading.Thread(target=self._loop, args=(h,), daemon=True) for h in AGENTS]

    def _loop(self, host: str) -> None:
        client = OpenAI(base_url=self.d.agent_url(host) + "/v1", api_key=self.key, timeout=60, max_retries=0)
        while not self.stop.is_set():
            try:
                reply = client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4
                )
                assert reply.choices[0].message.content
                self.ok[host] += 1
            except Exception as e:  # every failure is reported, with when it happened
                self.failures.append((host, time.time(), f"{type(e).__name__}: {e}"))

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(90)


def test_rolling_upgrade_under_traffic_fails_nothing_and_keeps_the_servers(deployment: Deployment) -> None:
    d = deployment
    before = {h: d.agent_status(h) for h in AGENTS}
    servers = {h: {i["name"]: i["pid"] for i in st["instances"]} for h, st in before.items()}
    agents = {h: d.unit(h, "gpu-agent")["MainPID"] for h in AGENTS}
    wheel = d.build_wheel(NEW_VERSION)
    t0 = time.monotonic()
    with Traffic(d) as traffic:
        # Some traffic before, some after: the restarts happen in the middle of it.
        while sum(traffic.ok.values()) < 20:
            time.sleep(0.05)
        recap = d.play({"gpufleet_package_wheel": str(wheel)}, label="rolling upgrade", limit="gpu_nodes")
        # The new version is the fleet's baseline from now on (a later "second run changes
        # nothing" must not read as a downgrade).
        d.playbook.variables["gpufleet_package_wheel"] = str(wheel)
        upgraded = time.monotonic() - t0
        done = sum(traffic.ok.values())
        while sum(traffic.ok.values()) < done + 20:
            time.sleep(0.05)
    d.timings["rolling upgrade of 2 agents (playbook)"] = upgraded
    assert all(c["failed"] == 0 for c in recap.hosts.values()), recap.hosts
    assert traffic.failures == [], traffic.failures[:5]
    assert all(traffic.ok[h] > 0 for h in AGENTS), traffic.ok
    for h in AGENTS:
        st = d.wait_agent_ready(h)
        assert st["agent_version"] == NEW_VERSION, (h, st["agent_version"])
        props = d.unit(h, "gpu-agent")
        assert props["MainPID"] != agents[h] and props["ActiveState"] == "active", (h, props)
        now = {i["name"]: i["pid"] for i in st["instances"]}
        assert now == servers[h], f"{h}: model servers restarted: {servers[h]} -> {now}"
        assert all(i["restarts"] == 0 for i in st["instances"]), st["instances"]
        assert not d.orphans(h), d.orphans(h)
        adopted = d.ssh(h, "journalctl -u gpu-agent --no-pager -o cat | grep -c 'instance adopted'", check=False)
        assert adopted.stdout.strip() not in ("", "0"), (h, adopted.stdout, adopted.stderr)
