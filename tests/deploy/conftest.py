"""Fixtures of the deployment tests: three booted Debian 12 hosts deployed by ansible/deploy.yml.

``deployment`` (session scope) builds or reuses the cached image, apt repository and wheelhouse
(tests/deploy/nspawn.py), boots ``gf-ctl`` (etcd + coordinator) and ``gf-gpu-a``/``gf-gpu-b``
(agents with simulated GPUs and simulated vLLM servers) on a bridge of their own, runs the
playbook once, and tears everything down at the end of the session, also when a test or the
setup failed. Tests that change a host put it back as they found it (units running, same
config), so any order works and later tests (e.g. a rolling re-deploy) start from a deployed
fleet.

Where containers cannot run (not root, no systemd-nspawn, a kernel or sandbox that refuses),
the tests skip with the reason; in CI (``CI=true``) that is a failure instead, since a skip
there would hide a regression.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nspawn
import pytest
from playbook import ETCD_PASSWORD, MODEL, Playbook, Recap, default_vars

CONTROL = "gf-ctl"
AGENTS = ("gf-gpu-a", "gf-gpu-b")
GROUPS: Mapping[str, list[str]] = {"etcd": [CONTROL], "coordinators": [CONTROL], "gpu_nodes": list(AGENTS)}
AGENT_PORT = 8080
COORDINATOR_PORT = 8090
CLUSTER = "deploy"
GPUCTL = "/opt/gpufleet/venv/bin/gpuctl"
# The API key the tests send their OpenAI traffic with (the role's agents run [auth] mode "keys").
KEY_NAME = "deploy-tests"

TIMINGS: dict[str, float] = {}


def skip_or_fail(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"deployment tests cannot run, and CI must run them: {reason}", pytrace=False)
    pytest.skip(f"deployment tests: {reason}")


@dataclass
class Deployment:
    """The deployed fleet and what the tests do with it."""

    fleet: nspawn.Fleet
    playbook: Playbook
    workdir: Path
    first: Recap
    timings: dict[str, float] = field(default_factory=dict)

    control: str = CONTROL
    agents: tuple[str, ...] = AGENTS

    # --- hosts --------------------------------------------------------------------------

    def address(self, host: str) -> str:
        return self.fleet.containers[host].address

    def ssh(self, host: str, command: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        """A shell command on ``host`` as root (``check=False`` to look at a failure yourself)."""
        return self.fleet.ssh(host, command, **kw)

    def unit(self, host: str, unit: str) -> dict[str, str]:
        """``systemctl show`` of a unit: ActiveState, SubState, MainPID, NRestarts, StatusText, ..."""
        props = "ActiveState,SubState,MainPID,NRestarts,StatusText,Result,ExecMainStatus,WatchdogUSec,LoadState"
        out = self.ssh(host, f"systemctl show {unit} -p {props}").stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def processes(self, host: str) -> dict[int, tuple[int, str]]:
        """Live processes in the container (its own PID namespace): pid -> (ppid, command line)."""
        script = (
            "import os,json\n"
            "out={}\n"
            "for p in os.listdir('/proc'):\n"
            "    if not p.isdigit() or int(p)==os.getpid(): continue\n"
            "    try:\n"
            "        st=open(f'/proc/{p}/stat').read().rsplit(')',1)[1].split()\n"
            "        cmd=open(f'/proc/{p}/cmdline','rb').read().replace(b'\\0',b' ').decode(errors='replace')\n"
            "    except OSError: continue\n"
            "    if st[0]!='Z': out[p]=[int(st[1]),cmd]\n"
            "print(json.dumps(out))\n"
        )
        out = self.ssh(host, "python3 -", input=script).stdout
        return {int(k): (ppid, cmd) for k, (ppid, cmd) in json.loads(out).items()}

    def model_servers(self, host: str) -> dict[int, tuple[int, str]]:
        """Every process of a model server: the server itself (``-m gpufleet_dev.simulated_server``)
        and whatever wraps it (a keeper process that holds it across agent restarts, if any)."""
        return {p: v for p, v in self.processes(host).items() if "gpufleet_dev.simulated_server" in v[1]}

    def orphans(self, host: str) -> dict[int, tuple[int, str]]:
        """Model-server processes the running agent does not account for: a server whose pid is
        not an instance's pid in /v1/status, or a wrapper none of whose children is one."""
        procs = self.model_servers(host)
        supervised = self.instance_pids(host)
        servers = {p for p, (_, cmd) in procs.items() if cmd.split()[1:3] == ["-m", "gpufleet_dev.simulated_server"]}
        wrappers = set(procs) - servers
        out = {p: procs[p] for p in servers - supervised}
        for w in wrappers:
            if not any(procs[s][0] == w for s in servers & supervised):
                out[w] = procs[w]
        return out

    def journal_cursor(self, host: str) -> str:
        out = self.ssh(host, "journalctl -n 0 --show-cursor --no-pager").stdout
        return out.strip().rsplit("cursor: ", 1)[-1]

    def journal(self, host: str, unit: str, after: str | None = None) -> list[dict]:
        """The unit's journal entries (JSON: MESSAGE, PRIORITY, ...) after a cursor. (systemd
        252's journalctl returns nothing for -u and -p together with --after-cursor: filter
        PRIORITY here, or use --since.)"""
        cmd = f"journalctl -u {unit} -o json --no-pager"
        if after:
            cmd += f" --after-cursor='{after}'"
        out = self.ssh(host, cmd, check=False).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def clock(self, host: str) -> float:
        return float(self.ssh(host, "date +%s.%N").stdout)

    # --- the agent's API ----------------------------------------------------------------

    def agent_url(self, host: str) -> str:
        """Base URL of a host's agent from this machine (the OpenAI API is under /v1)."""
        return f"http://{self.address(host)}:{AGENT_PORT}"

    def coordinator_url(self) -> str:
        return f"http://{self.address(CONTROL)}:{COORDINATOR_PORT}"

    def http_json(
        self, url: str, timeout: float = 5, *, body: Any = None, headers: Mapping[str, str] | None = None
    ) -> tuple[int, Any]:
        """GET ``url`` (POST ``body`` as JSON when given): the status and the decoded answer."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, headers={**(headers or {})})
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def metric(self, host: str, name: str, **labels: str) -> float:
        """One sample of the agent's /metrics (0 when the series does not exist yet)."""
        with urllib.request.urlopen(self.agent_url(host) + "/metrics", timeout=5) as r:
            text = r.read().decode()
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            series, _, value = line.rpartition(" ")
            if series.split("{", 1)[0] != name:
                continue
            got = ",".join(sorted(series.partition("{")[2].rstrip("}").split(","))) if "{" in series else ""
            if got == want:
                return float(value)
        return 0.0

    def agent_status(self, host: str) -> dict[str, Any]:
        code, body = self.http_json(self.agent_url(host) + "/v1/status")
        assert code == 200, body
        return body

    def instance_pids(self, host: str) -> set[int]:
        return {i["pid"] for i in self.agent_status(host)["instances"] if i.get("pid")}

    def wait_agent_ready(self, host: str, timeout: float = 120) -> dict[str, Any]:
        """Until the agent's unit is active and its /readyz says every instance is READY."""

        def ready() -> dict[str, Any] | None:
            if self.unit(host, "gpu-agent")["ActiveState"] != "active":
                return None
            code, _ = self.http_json(self.agent_url(host) + "/readyz")
            return self.agent_status(host) if code == 200 else None

        return nspawn.wait_for(ready, timeout, f"gpu-agent on {host} ready", interval=0.5)

    # --- gpuctl and API keys -------------------------------------------------------------

    def gpuctl(self, host: str, args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``gpuctl ARGS`` on a host against the fleet's etcd, with the etcd client files the
        playbook installed there (the coordinator's on the control host, the agent's elsewhere)."""
        cfg = "/etc/gpu-coordinator" if host == CONTROL else "/etc/gpu-agent"
        return self.ssh(
            host,
            f"{GPUCTL} --etcd https://{self.address(CONTROL)}:2379 --cluster {CLUSTER} --cacert {cfg}/etcd-ca.pem "
            f"--cert {cfg}/etcd-client.pem --key {cfg}/etcd-client-key.pem --user gpufleet "
            f"--password-file {cfg}/etcd-password {args}",
            check=check,
        )

    @functools.cached_property
    def api_key(self) -> str:
        """The secret of an API key made with ``gpuctl keys create`` on the control host (once
        per session); every agent accepts it when this returns (the agents mirror the keys)."""
        made = json.loads(self.gpuctl(CONTROL, f"keys create {KEY_NAME} --owner tests/deploy -o json").stdout)
        assert made["name"] == KEY_NAME and made["secret"], made
        secret: str = made["secret"]
        for host in self.agents:
            nspawn.wait_for(
                lambda h=host: self.chat(h, secret)[0] == 200, 30, f"the agent on {host} accepting the new key"
            )
        return secret

    def chat(self, host: str, key: str | None, headers: Mapping[str, str] | None = None) -> tuple[int, Any]:
        """A short chat completion through a host's agent with ``key`` (None: no credential)."""
        auth = {"Authorization": f"Bearer {key}"} if key is not None else {}
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        return self.http_json(
            self.agent_url(host) + "/v1/chat/completions", 30, body=body, headers={**auth, **(headers or {})}
        )

    # --- etcd from this machine ---------------------------------------------------------

    def etcdctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """This machine's etcdctl against the fleet's etcd with the playbook's TLS client
        certificate (from gpufleet_pki_dir) and the gpufleet user."""
        pki = self.workdir / "pki"
        argv = [
            "etcdctl",
            f"--endpoints=https://{self.address(CONTROL)}:2379",
            f"--cacert={pki / 'ca.pem'}",
            f"--cert={pki / 'client.pem'}",
            f"--key={pki / 'client-key.pem'}",
            f"--user=gpufleet:{ETCD_PASSWORD}",
            "--command-timeout=5s",
            *args,
        ]
        return nspawn.run(argv, check=check, timeout=30, env={**os.environ, "ETCDCTL_API": "3"})

    def etcd_keys(self, prefix: str = "/gpufleet/") -> list[str]:
        return self.etcdctl("get", "--prefix", "--keys-only", prefix).stdout.split()

    # --- the playbook -------------------------------------------------------------------

    def play(self, extra_vars: Mapping[str, Any] | None = None, **kw: Any) -> Recap:
        """Run ansible/deploy.yml again with this deployment's inventory and variables plus
        ``extra_vars``; returns the recap (``.hosts[name]['changed']``, ``.changed_tasks()``)."""
        return self.playbook.play(extra_vars, **kw)

    def build_wheel(self, version: str | None = None) -> Path:
        """A wheel of this checkout, optionally under another version (for re-deploys)."""
        return nspawn.build_wheel(self.workdir, version)


@pytest.fixture(scope="session")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    reason = nspawn.why_not()
    if reason is not None:
        skip_or_fail(reason)
    workdir = tmp_path_factory.mktemp("deploy")
    t0 = time.monotonic()
    artifacts = nspawn.artifacts()
    for k, v in artifacts.seconds.items():
        TIMINGS[f"{k} (build or reuse)"] = v
    t0 = time.monotonic()
    wheel = nspawn.build_wheel(workdir)
    TIMINGS["gpufleet wheel"] = time.monotonic() - t0
    fleet = nspawn.Fleet(workdir, artifacts, [CONTROL, *AGENTS])
    try:
        t0 = time.monotonic()
        try:
            fleet.up()
        except (AssertionError, RuntimeError) as e:
            skip_or_fail(f"systemd-nspawn cannot boot the test hosts here: {e}")
        TIMINGS["boot 3 hosts"] = time.monotonic() - t0
        pb = Playbook(fleet, GROUPS, workdir, default_vars(workdir, wheel))
        pb.write_inventory()
        first = pb.play(label="first deploy")
        TIMINGS["first playbook run"] = first.seconds
        yield Deployment(fleet, pb, workdir, first, TIMINGS)
    finally:
        t0 = time.monotonic()
        fleet.destroy()
        TIMINGS["teardown"] = time.monotonic() - t0
        (workdir / "timings.json").write_text(json.dumps({k: round(v, 1) for k, v in TIMINGS.items()}, indent=2))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """test_systemd_hosts.py first: its checks are of the first deployment (e.g. a second run
    with the same variables changes nothing); scenarios that re-deploy run after it."""
    here = Path(__file__).parent
    positions = [i for i, item in enumerate(items) if item.path.parent == here]
    ours = sorted((items[i] for i in positions), key=lambda item: item.path.name != "test_systemd_hosts.py")
    for i, item in zip(positions, ours, strict=True):
        items[i] = item


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if TIMINGS:
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in TIMINGS.items())
        terminalreporter.write_line(f"deployment tests on systemd hosts: {parts}")
