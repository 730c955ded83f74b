"""The Ansible deployment (ansible/) run for real against this machine, into a temporary root.

A deployment test (``-m deploy``, CI's second step): four playbook runs take minutes. The
booted-hosts tests beside it deploy the same playbook onto real systemd hosts; this one covers
what they do not: a deployment that touches no services, users or packages (a root of its own),
and ``--check`` mode.

Everything lands under a temporary ``gpufleet_root``: no systemctl (``gpufleet_manage_services``
false), no users or chown (``gpufleet_manage_users`` false), no apt (``gpufleet_etcd_install_package``
false). The package is installed from a wheel of this checkout into the temporary venv.

When an etcd binary is available, the etcd the role configured is started from the environment
file the role wrote (TLS, client certificate auth), the playbook runs again to create the
``gpufleet`` user and role and enable auth with etcdctl, and the agent's rendered config is used
to write under ``/gpufleet/`` through gpufleet's own client (the client certificate has no CN).

A third run turns on HTTPS on the daemons' ports (``gpufleet_api_tls``, as an operator would on
a running cluster): each host's certificate signed by the cluster's CA, the ``[tls]`` sections,
https:// advertise URLs; with etcd, the deployed agent and coordinator are started from what the
play wrote and must answer HTTPS verified against the CA, and nothing in plain HTTP.

Then (with TLS on): a second run changes nothing, and a ``--check`` run passes and changes nothing.
(``ansible-lint --profile production``: tests/test_ansible_lint.py, in the default run.)
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import ssl
import stat
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from playbook import MODEL, ansible_env, simulated_vars

from gpufleet_dev.localfleet import Daemon, free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = ROOT / "ansible"
BIN = Path(sys.executable).parent


def _tool(name: str) -> str | None:
    local = BIN / name
    return str(local) if local.exists() else shutil.which(name)


PLAYBOOK = _tool("ansible-playbook")
ETCD = os.environ.get("GPUFLEET_ETCD_BIN") or shutil.which("etcd")
ETCDCTL = shutil.which("etcdctl", path=str(Path(ETCD).parent)) if ETCD else None

pytestmark = [
    pytest.mark.deploy,
    pytest.mark.skipif(PLAYBOOK is None, reason="ansible-playbook not installed (pip install -e '.[deploy]')"),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed"),
    pytest.mark.timeout(900),
]

RECAP = re.compile(r"localhost\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)")


class RoleEtcd(Daemon):
    """etcd as the role configured it: no flags, its settings from the environment file the role
    wrote (TLS, client certificate auth), and nothing else from ours."""

    name = "etcd"

    def __init__(self, base: Path, env_file: Path) -> None:
        super().__init__(base / "etcd.log")
        self.env = {"PATH": os.environ.get("PATH", "")}
        for line in env_file.read_text().splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.partition("=")
                self.env[key] = value.strip('"')

    def argv(self) -> list[str]:
        assert ETCD is not None
        return [ETCD]


class Deployed(Daemon):
    """A daemon the play installed, run as its unit would: the deployed virtualenv's command
    and the config the play wrote (no systemd here)."""

    def __init__(self, base: Path, command: Path, config: Path) -> None:
        super().__init__(base / f"{command.name}.log")
        self.name = command.name
        self.command, self.config = command, config

    def argv(self) -> list[str]:
        return [str(self.command), "--config", str(self.config)]


class Deployment:
    def __init__(self, base: Path):
        self.base = base
        self.root = base / "root"
        self.pki = base / "pki"
        self.inventory = base / "inventory.ini"
        self.vars_file = base / "vars.json"
        self.etcd: RoleEtcd | None = None
        self.client_port = free_port()
        self.peer_port = free_port()
        self.agent_port = free_port()
        self.coordinator_port = free_port()
        self.timings: dict[str, float] = {}

    def write(self, wheel: Path, configure_auth: bool, api_tls: bool = False) -> None:
        host = f"localhost ansible_connection=local ansible_python_interpreter={sys.executable}"
        self.inventory.write_text("".join(f"[{group}]\n{host}\n" for group in ("etcd", "coordinators", "gpu_nodes")))
        fleet = simulated_vars(warmup={"prompt": 'Say "hi"', "max_tokens": 2})
        fleet["gpufleet_agent_instances"].append(
            {"name": "embed", "backend": "vllm", "model": "/mnt/models/bge-m3", "warmup": {"kind": "embedding"}}
        )
        fleet["gpufleet_agent_settings"]["proxy"] = {"limits": {MODEL: {"max_concurrency": 4, "max_queue": 8}}}
        variables = {
            "gpufleet_root": str(self.root),
            "gpufleet_manage_services": False,
            "gpufleet_manage_users": False,
            "gpufleet_become": False,
            "gpufleet_etcd_install_package": False,
            "gpufleet_install_os_packages": False,
            "gpufleet_etcd_configure_auth": configure_auth,
            "gpufleet_etcd_listen_address": "127.0.0.1",
            "gpufleet_etcd_client_port": self.client_port,
            "gpufleet_etcd_peer_port": self.peer_port,
            "gpufleet_etcd_heartbeat_interval_ms": 50,
            "gpufleet_etcd_election_timeout_ms": 500,
            "gpufleet_pki_dir": str(self.pki),
            "gpufleet_package_wheel": str(wheel),
            "gpufleet_cluster": "ci",
            "gpufleet_etcd_password": "gpufleet-secret",
            "gpufleet_etcd_root_password": "root-secret",
            "gpufleet_agent_listen_port": self.agent_port,
            "gpufleet_coordinator_listen_port": self.coordinator_port,
            "gpufleet_api_tls": api_tls,
            **fleet,
            "gpufleet_coordinator_settings": {"weights": {"base": {"A100": 220, "H100": 380}}},
        }
        self.vars_file.write_text(json.dumps(variables))

    def play(self, *extra: str, label: str) -> tuple[dict[str, int], str]:
        env = ansible_env(self.base, ANSIBLE_REMOTE_TEMP=str(self.base / "ansible-tmp"))
        argv = [PLAYBOOK, "-i", str(self.inventory), "deploy.yml", "-e", f"@{self.vars_file}", *extra]
        t0 = time.monotonic()
        res = subprocess.run(argv, cwd=ANSIBLE_DIR, env=env, capture_output=True, text=True, timeout=600)
        self.timings[label] = time.monotonic() - t0
        out = res.stdout + res.stderr
        m = RECAP.search(res.stdout)
        assert res.returncode == 0 and m, f"{label}: ansible-playbook exited {res.returncode}\n{out[-8000:]}"
        ok, changed, unreachable, failed = map(int, m.groups())
        return {"ok": ok, "changed": changed, "unreachable": unreachable, "failed": failed}, out

    def start_etcd(self) -> None:
        self.etcd = RoleEtcd(self.base, self.root / "etc/default/etcd").start()

    def stop_etcd(self) -> None:
        if self.etcd is not None:
            self.etcd.kill()


@pytest.fixture(scope="module")
def local_root(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("ansible")
    d = Deployment(base)
    t0 = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(ROOT), "-w", str(base / "dist")],
        check=True,
        capture_output=True,
        timeout=300,
    )
    d.timings["wheel"] = time.monotonic() - t0
    wheel = next((base / "dist").glob("gpufleet-*.whl"))
    d.write(wheel, configure_auth=False)
    d.first, d.first_out = d.play(label="first run")
    d.with_auth = None
    if ETCD and ETCDCTL:
        d.start_etcd()
        d.write(wheel, configure_auth=True)
        d.with_auth, d.with_auth_out = d.play(label="auth run")
    d.write(wheel, configure_auth=d.with_auth is not None, api_tls=True)
    d.with_tls, d.with_tls_out = d.play(label="tls run")
    try:
        yield d
    finally:
        d.stop_etcd()
        print("ansible timings:", {k: round(v, 1) for k, v in d.timings.items()})


def test_first_run_installs_everything(local_root: Deployment) -> None:
    r = local_root.root
    assert local_root.first["failed"] == 0 and local_root.first["changed"] > 0
    venv = r / "opt/gpufleet/venv/bin"
    names = ("agent.toml", "admin-token", "hop-secret", "etcd-ca.pem", "etcd-client.pem", "etcd-client-key.pem")
    for name in (*names, "etcd-password"):
        assert (r / "etc/gpu-agent" / name).is_file(), name
    assert stat.S_IMODE((r / "etc/gpu-agent/admin-token").stat().st_mode) == 0o600
    assert len((r / "etc/gpu-agent/admin-token").read_text().strip()) >= 40
    for cmd, cfg in (
        ("gpu-agent", "etc/gpu-agent/agent.toml"),
        ("gpu-coordinator", "etc/gpu-coordinator/coordinator.toml"),
    ):
        res = subprocess.run([venv / cmd, "check-config", r / cfg], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
    # API keys by default, and the hop secret generated once on the control node: the agents
    # listen on 0.0.0.0 in cluster mode, where check-config refuses "keys" without one.
    agent = tomllib.loads((r / "etc/gpu-agent/agent.toml").read_text())
    assert agent["auth"] == {"mode": "keys", "hop_secret_file": str(r / "etc/gpu-agent/hop-secret")}
    secret = (r / "etc/gpu-agent/hop-secret").read_bytes()
    assert secret == (local_root.pki / "hop-secret").read_bytes() and len(secret.strip()) >= 32
    assert stat.S_IMODE((r / "etc/gpu-agent/hop-secret").stat().st_mode) == 0o640
    assert stat.S_IMODE((local_root.pki / "hop-secret").stat().st_mode) == 0o600
    unit = (r / "etc/systemd/system/gpu-agent.service").read_text()
    assert unit == (ROOT / "systemd/gpu-agent.service").read_text()
    assert (r / "etc/systemd/system/gpu-coordinator.service").is_file()
    etcd_env = (r / "etc/default/etcd").read_text()
    assert 'ETCD_CLIENT_CERT_AUTH="true"' in etcd_env
    assert 'ETCD_PRE_VOTE="true"' in etcd_env
    assert stat.S_IMODE((r / "etc/etcd/pki/server-key.pem").stat().st_mode) == 0o600


def test_client_certificate_has_no_common_name(local_root: Deployment) -> None:
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    cert = x509.load_pem_x509_certificate((local_root.root / "etc/gpu-agent/etcd-client.pem").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME) == []
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
    server = x509.load_pem_x509_certificate((local_root.root / "etc/etcd/pki/server.pem").read_bytes())
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku and ExtendedKeyUsageOID.CLIENT_AUTH in eku


@pytest.mark.skipif(not (ETCD and ETCDCTL), reason="etcd/etcdctl not installed")
async def test_auth_limits_the_gpufleet_user_to_its_prefix(local_root: Deployment) -> None:
    from agent.config import load_config
    from gpufleet.etcd import EtcdAuthError

    assert local_root.with_auth is not None and local_root.with_auth["changed"] > 0
    cfg = load_config(local_root.root / "etc/gpu-agent/agent.toml")
    async with cfg.cluster.client() as etcd:
        await etcd.put("/gpufleet/ci/probe", "ok")
        kv = await etcd.get("/gpufleet/ci/probe")
        assert kv is not None and kv.value == b"ok"
        with pytest.raises(EtcdAuthError):
            await etcd.put("/elsewhere", "no")


def test_second_run_changes_nothing(local_root: Deployment) -> None:
    recap, out = local_root.play(label="second run")
    assert recap["changed"] == 0, out[-8000:]


def test_check_mode_passes(local_root: Deployment) -> None:
    recap, out = local_root.play("--check", "--diff", label="check run")
    assert recap["failed"] == 0 and recap["changed"] == 0, out[-8000:]


def test_api_tls_certificate_and_config(local_root: Deployment) -> None:
    """gpufleet_api_tls: one certificate per host, signed by the cluster's CA (etcd's), with the
    names clients and the ready check use; installed root-owned with the key closed to others,
    and named by both daemons' [tls]."""
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    r, pki = local_root.root, local_root.pki
    assert local_root.with_tls["changed"] > 0
    agent_dir, coord_dir = r / "etc/gpu-agent", r / "etc/gpu-coordinator"
    agent = tomllib.loads((agent_dir / "agent.toml").read_text())
    assert agent["tls"] == {
        "cert_file": str(agent_dir / "tls-cert.pem"),
        "key_file": str(agent_dir / "tls-key.pem"),
        "ca_file": str(agent_dir / "tls-ca.pem"),
    }
    assert agent["agent"]["advertise_url"] == f"https://localhost:{local_root.agent_port}"
    coordinator = tomllib.loads((coord_dir / "coordinator.toml").read_text())
    assert coordinator["tls"] == {
        "cert_file": str(coord_dir / "tls-cert.pem"),
        "key_file": str(coord_dir / "tls-key.pem"),
    }
    assert coordinator["coordinator"]["advertise_url"] == f"https://localhost:{local_root.coordinator_port}"

    for d in (agent_dir, coord_dir):
        modes = {
            name: stat.S_IMODE((d / name).stat().st_mode) for name in ("tls-cert.pem", "tls-key.pem", "tls-ca.pem")
        }
        assert modes == {"tls-cert.pem": 0o644, "tls-key.pem": 0o640, "tls-ca.pem": 0o644}, d
        # One certificate per host whichever daemon serves on it; one CA with etcd.
        assert (d / "tls-cert.pem").read_bytes() == (pki / "api-localhost.pem").read_bytes()
        assert (d / "tls-key.pem").read_bytes() == (pki / "api-localhost-key.pem").read_bytes()
        assert (d / "tls-ca.pem").read_bytes() == (agent_dir / "etcd-ca.pem").read_bytes()
    assert stat.S_IMODE((pki / "api-localhost-key.pem").stat().st_mode) == 0o600

    cert = x509.load_pem_x509_certificate((agent_dir / "tls-cert.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((agent_dir / "tls-ca.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def _get(url: str, context: ssl.SSLContext | None = None) -> int:
    with urllib.request.urlopen(url, timeout=5, context=context) as res:
        return res.status


@pytest.mark.skipif(not (ETCD and ETCDCTL), reason="etcd/etcdctl not installed (the daemons are cluster members)")
def test_deployed_daemons_serve_https_only(local_root: Deployment) -> None:
    """The agent and the coordinator started from what the play installed answer HTTPS verified
    against the cluster's CA, by name and at 127.0.0.1 (the restart's ready check, done here with
    Ansible's uri module as the handler does it); a client without the CA, and plain HTTP, fail."""
    r = local_root.root
    venv = r / "opt/gpufleet/venv/bin"
    ca = ssl.create_default_context(cafile=str(r / "etc/gpu-agent/tls-ca.pem"))
    daemons = [
        (Deployed(local_root.base, venv / "gpu-agent", r / "etc/gpu-agent/agent.toml"), local_root.agent_port),
        (
            Deployed(local_root.base, venv / "gpu-coordinator", r / "etc/gpu-coordinator/coordinator.toml"),
            local_root.coordinator_port,
        ),
    ]
    try:
        for daemon, port in daemons:
            daemon.start()
            wait_for(
                lambda port=port: _get(f"https://localhost:{port}/healthz", ca) == 200,
                timeout=60,
                what=f"{daemon.name} https /healthz",
                daemons=[daemon],
            )
            assert _get(f"https://127.0.0.1:{port}/healthz", ca) == 200
            with pytest.raises(urllib.error.URLError) as no_ca:
                _get(f"https://localhost:{port}/healthz", ssl.create_default_context())
            assert isinstance(no_ca.value.reason, ssl.SSLCertVerificationError), no_ca.value
            # The TLS handshake fails on a plain request: the connection closes (or an alert
            # comes back, not an HTTP status line).
            with pytest.raises((OSError, http.client.HTTPException)):
                _get(f"http://127.0.0.1:{port}/healthz")
            res = subprocess.run(
                [
                    _tool("ansible"),
                    "localhost",
                    "-i",
                    str(local_root.inventory),
                    "-m",
                    "ansible.builtin.uri",
                    "-a",
                    f"url=https://127.0.0.1:{port}/healthz ca_path={r / 'etc/gpu-agent/tls-ca.pem'}",
                ],
                env=ansible_env(local_root.base),
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert res.returncode == 0 and '"status": 200' in res.stdout, res.stdout[-4000:] + res.stderr[-2000:]
    finally:
        for daemon, _ in daemons:
            daemon.stop()
