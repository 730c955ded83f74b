"""Real etcd processes for tests: single members and 3-member clusters, optionally with TLS and auth.

tests/conftest.py registers this module as a pytest plugin, so the fixtures (``etcd``,
``etcd_cluster3``, ``etcd_tls``, ``etcd_auth``) are available to every test module; the classes
can be used directly for members of a test's own. Set ``GPUFLEET_ETCD_BIN`` to test another build.

Members run on free loopback ports with their data in a temporary directory, with fast raft
timings (heartbeat 50 ms, election 500 ms) so elections and leader loss take about a second,
pre-vote on, and with watch progress notifications every second. Start-up waits on ``/health`` (which also needs a
leader) with a deadline; teardown SIGKILLs whatever is left and removes the data directories.

The fixtures are synchronous so they can be module-scoped (one etcd for many tests; a single
member starts in well under a second); tests use unique key prefixes so they do not see each
other's keys. Tests that stop or kill members restore them before they finish.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import free_port, wait_until

from gpufleet.etcd import EtcdClient, EtcdError

# GPUFLEET_ETCD_BIN picks another etcd build (e.g. a 3.5 release) to run the same tests against.
ETCD_BIN = os.environ.get("GPUFLEET_ETCD_BIN") or shutil.which("etcd")
SKIP_REASON = "no etcd binary on PATH (scripts/bootstrap installs Debian's etcd-server; CI does too)"
requires_etcd = pytest.mark.skipif(ETCD_BIN is None, reason=SKIP_REASON)

ROOT_PASSWORD = "root-test-password"
USER = "gpufleet"
USER_PASSWORD = "gpufleet-test-password"
USER_PREFIX = "/gpufleet/"


def _etcd_help() -> str:
    if ETCD_BIN is None:
        return ""
    r = subprocess.run([ETCD_BIN, "--help"], capture_output=True, text=True, timeout=30)
    return r.stdout + r.stderr


_HELP = _etcd_help()


# --- TLS material ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str  # a CA that signed nothing here: "wrong CA" tests
    other_client_cert: str  # a client certificate signed by other_ca
    other_client_key: str


def make_tls(directory: Path) -> TlsFiles:
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate, and a stranger CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def write_key(k: ec.EllipticCurvePrivateKey, name: str) -> str:
        p = directory / name
        p.write_bytes(
            k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        p.chmod(0o600)
        return str(p)

    def write_cert(c: x509.Certificate, name: str) -> str:
        p = directory / name
        p.write_bytes(c.public_bytes(serialization.Encoding.PEM))
        return str(p)

    def ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        k = key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(k.public_key()), critical=False)
            .sign(k, hashes.SHA256())
        )
        return k, cert

    def leaf(
        ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, cn: str, usages: list[x509.ObjectIdentifier]
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        import ipaddress

        k = key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else []))
            .issuer_name(ca_cert.subject)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        return k, cert

    ca_key, ca_cert = ca("gpufleet test CA")
    # etcd's gateway dials etcd's own gRPC server with the server certificate, so with
    # --client-cert-auth the server certificate must be valid for client auth too.
    s_key, s_cert = leaf(ca_key, ca_cert, "etcd", [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    # Client certificates for the JSON gateway carry no Common Name: with auth enabled, etcd
    # 3.4 answers any gateway request presenting one with HTTP 400 "CommonName of client sending
    # a request against gateway will be ignored and not used as expected" (gRPC clients would
    # be authenticated as that CN; the gateway cannot pass it on). SANs identify the client.
    c_key, c_cert = leaf(ca_key, ca_cert, "", [ExtendedKeyUsageOID.CLIENT_AUTH])
    o_key, o_cert = ca("some other CA")
    oc_key, oc_cert = leaf(o_key, o_cert, "", [ExtendedKeyUsageOID.CLIENT_AUTH])
    return TlsFiles(
        ca=write_cert(ca_cert, "ca.pem"),
        server_cert=write_cert(s_cert, "server.pem"),
        server_key=write_key(s_key, "server-key.pem"),
        client_cert=write_cert(c_cert, "client.pem"),
        client_key=write_key(c_key, "client-key.pem"),
        other_ca=write_cert(o_cert, "other-ca.pem"),
        other_client_cert=write_cert(oc_cert, "other-client.pem"),
        other_client_key=write_key(oc_key, "other-client-key.pem"),
    )


# --- processes ---------------------------------------------------------------------------------


class EtcdMember:
    """One etcd process. ``start()`` needs the cluster's ``--initial-cluster`` string."""

    def __init__(self, name: str, base: Path, *, tls: TlsFiles | None = None, extra_args: list[str] | None = None):
        self.name = name
        self.data_dir = base / name
        self.log_path = base / f"{name}.log"
        self.client_port = free_port()
        self.peer_port = free_port()
        self.tls = tls
        self.extra_args = list(extra_args or [])
        # Where it listens, and a command prefix: a partition test puts a member in a network
        # namespace (``ip netns exec NS``) with its client and peer traffic on separate links.
        self.client_host = "127.0.0.1"
        self.peer_host = "127.0.0.1"
        self.prefix: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.cluster_token = f"gpufleet-test-{os.getpid()}"
        self._initial_cluster = ""
        self._log: Any = None

    @property
    def client_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.client_host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.peer_host}:{self.peer_port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def argv(self) -> list[str]:
        assert ETCD_BIN is not None
        args = [
            *self.prefix,
            ETCD_BIN,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self._initial_cluster,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", self.cluster_token,
            "--heartbeat-interval", "50",
            "--election-timeout", "500",
            "--logger", "zap",
            "--log-outputs", "stderr",
        ]  # fmt: skip
        if "--pre-vote" in _HELP:
            # As ansible deploys it (and etcd 3.5+ defaults to): a member coming back from a
            # partition does not force an election on the healthy majority.
            args += ["--pre-vote=true"]
        if "--experimental-watch-progress-notify-interval" in _HELP:
            args += ["--experimental-watch-progress-notify-interval", "1s"]
        if self.tls:
            args += [
                "--cert-file", self.tls.server_cert,
                "--key-file", self.tls.server_key,
                "--trusted-ca-file", self.tls.ca,
                "--client-cert-auth",
            ]  # fmt: skip
        return args + self.extra_args

    def start(self, initial_cluster: str | None = None) -> None:
        """Start the process (again, on the same data directory and ports, after stop/kill)."""
        if initial_cluster is not None:
            self._initial_cluster = initial_cluster
        assert not self.running(), f"{self.name} is already running"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv(), stdout=self._log, stderr=subprocess.STDOUT)

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        ctx = ssl.create_default_context(cafile=self.tls.ca)
        ctx.load_cert_chain(self.tls.client_cert, self.tls.client_key)
        return ctx

    def healthy_sync(self) -> bool:
        """``/health`` says true: the member serves and has a leader."""
        if not self.running():
            assert self.proc is not None
            raise AssertionError(f"etcd {self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(self.client_url + "/health", timeout=2, context=self._ssl_context()) as r:
                return json.loads(r.read()).get("health") == "true"
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def wait_healthy_sync(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy_sync():
            if time.monotonic() > deadline:
                raise AssertionError(f"etcd {self.name} not healthy after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)

    async def wait_healthy(self, timeout: float = 30.0) -> None:
        await wait_until(self.healthy_sync, timeout=timeout, what=f"etcd {self.name} healthy")

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def _signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def sigstop(self) -> None:
        self._signal(signal.SIGSTOP)

    def sigcont(self) -> None:
        self._signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL and reap (a stopped process dies too)."""
        if self.running():
            self._signal(signal.SIGKILL)
        self._reap()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (after SIGCONT, in case it is stopped), SIGKILL if it lingers."""
        if self.running():
            self._signal(signal.SIGCONT)
            self._signal(signal.SIGTERM)
            try:
                assert self.proc is not None
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
        self._reap()

    def _reap(self) -> None:
        if self.proc is not None:
            self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self) -> None:
        """Stop if running, start again on the same data directory; wait with wait_healthy()."""
        self.stop()
        self.start()


class EtcdCluster:
    """1 or 3 members; optionally TLS (client certificates required) and auth (root + gpufleet user)."""

    def __init__(
        self,
        size: int = 1,
        *,
        tls: bool = False,
        auth: bool = False,
        extra_args: list[str] | None = None,
        base: Path | None = None,
    ) -> None:
        if ETCD_BIN is None:
            pytest.skip(SKIP_REASON)
        self._own_base = base is None
        self.base = base or Path(tempfile.mkdtemp(prefix="gpufleet-etcd-"))
        self.tls = make_tls(self.base / "tls") if tls else None
        self.auth = auth
        self.members = [EtcdMember(f"m{i}", self.base, tls=self.tls, extra_args=extra_args) for i in range(size)]

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def member_at(self, endpoint: str) -> EtcdMember:
        return next(m for m in self.members if m.client_url == endpoint.rstrip("/"))

    async def raft_leader(self) -> EtcdMember | None:
        """The member that says it leads (asked one by one); None while there is no leader."""
        for m in self.members:
            if not m.running():
                continue
            async with self.client(endpoints=[m.client_url], timeout=1.0) as c:
                try:
                    st = await c.status(endpoint=m.client_url)
                except EtcdError:
                    continue
            if st.leader and st.leader == st.member_id:
                return m
        return None

    def start(self, timeout: float = 30.0) -> EtcdCluster:
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        try:
            for m in self.members:
                m.start(initial)
            for m in self.members:
                m.wait_healthy_sync(timeout)
            if self.auth:
                self._enable_auth()
        except BaseException:
            self.destroy()
            raise
        return self

    # --- the operator's disaster recovery (etcd's "recovering a cluster" procedure) -----------

    def snapshot_save(self, path: Path) -> Path:
        """``etcdctl snapshot save`` from the first running member (a backup, as operators take them)."""
        member = next(m for m in self.members if m.running())
        _etcdctl(member, "snapshot", "save", str(path))
        return path

    def restore(self, snapshot: Path, timeout: float = 30.0) -> None:
        """Stop every member, ``etcdctl snapshot restore`` each one's data directory from
        ``snapshot`` (same names, peer URLs and cluster token), start them again: the store
        goes back to the snapshot's keys, leases and revision."""
        for m in self.members:
            m.stop()
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for m in self.members:
            shutil.rmtree(m.data_dir, ignore_errors=True)
            _etcdctl(
                m,
                "snapshot", "restore", str(snapshot),
                "--name", m.name,
                "--data-dir", str(m.data_dir),
                "--initial-cluster", initial,
                "--initial-cluster-token", m.cluster_token,
                "--initial-advertise-peer-urls", m.peer_url,
                endpoint=False,
            )  # fmt: skip
        self._start_all(timeout)

    def wipe(self, timeout: float = 30.0) -> None:
        """Stop every member, delete the data, start an empty cluster on the same addresses
        (a lost disk, or an operator starting over)."""
        for m in self.members:
            m.stop()
            shutil.rmtree(m.data_dir, ignore_errors=True)
        self._start_all(timeout)

    def _start_all(self, timeout: float) -> None:
        for m in self.members:
            m.start()
        for m in self.members:
            m.wait_healthy_sync(timeout)

    def destroy(self) -> None:
        """Kill every member (no leftovers) and remove the data directories."""
        for m in self.members:
            try:
                m.kill()
            except Exception:  # keep killing the others
                pass
        if self._own_base:
            shutil.rmtree(self.base, ignore_errors=True)

    def client(self, *, user: str | None = None, password: str | None = None, **kw: Any) -> EtcdClient:
        """An EtcdClient for this cluster (with the test CA and client certificate when TLS)."""
        if self.tls:
            kw.setdefault("ca_file", self.tls.ca)
            kw.setdefault("cert_file", self.tls.client_cert)
            kw.setdefault("key_file", self.tls.client_key)
        if self.auth and user is None:
            user, password = "root", ROOT_PASSWORD
        kw.setdefault("endpoints", self.endpoints)
        return EtcdClient(kw.pop("endpoints"), username=user, password=password, **kw)

    # --- admin over the raw gateway (our client only has the data-plane API) -----------------

    def admin(self, path: str, body: dict[str, Any], token: str | None = None) -> dict[str, Any]:
        """POST to the first running member's gateway; raises with etcd's error text."""
        member = next(m for m in self.members if m.running())
        req = urllib.request.Request(
            member.client_url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **({"Authorization": token} if token else {})},
        )
        try:
            with urllib.request.urlopen(req, timeout=10, context=member._ssl_context()) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise AssertionError(f"etcd {path}: {e.code} {e.read()[:300]!r}") from e

    def _enable_auth(self) -> None:
        b64 = lambda s: b64encode(s.encode()).decode()  # noqa: E731
        self.admin("/v3/auth/user/add", {"name": "root", "password": ROOT_PASSWORD})
        self.admin("/v3/auth/role/add", {"name": "root"})
        self.admin("/v3/auth/user/grant", {"user": "root", "role": "root"})
        self.admin("/v3/auth/user/add", {"name": USER, "password": USER_PASSWORD})
        self.admin("/v3/auth/role/add", {"name": "gpufleet-rw"})
        end = USER_PREFIX[:-1] + chr(ord(USER_PREFIX[-1]) + 1)
        perm = {"permType": "READWRITE", "key": b64(USER_PREFIX), "range_end": b64(end)}
        self.admin("/v3/auth/role/grant", {"name": "gpufleet-rw", "perm": perm})
        self.admin("/v3/auth/user/grant", {"user": USER, "role": "gpufleet-rw"})
        self.admin("/v3/auth/enable", {})


def _etcdctl(member: EtcdMember, *args: str, endpoint: bool = True) -> None:
    """Run etcdctl (v3 API) against ``member``; raises with its output when it fails."""
    etcdctl = shutil.which("etcdctl")
    assert etcdctl is not None, "etcdctl not on PATH (Debian's etcd-client package)"
    argv = [etcdctl, *(["--endpoints", member.client_url] if endpoint else []), *args]
    if member.tls and endpoint:
        argv += ["--cacert", member.tls.ca, "--cert", member.tls.client_cert, "--key", member.tls.client_key]
    res = subprocess.run(argv, env={**os.environ, "ETCDCTL_API": "3"}, capture_output=True, timeout=60)
    assert res.returncode == 0, f"etcdctl {' '.join(args)}: {res.stdout[-500:]!r} {res.stderr[-1500:]!r}"


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdCluster]:
    """One plain etcd member for the module (tests use their own key prefixes)."""
    cluster = EtcdCluster(1).start()
    yield cluster
    cluster.destroy()


@pytest.fixture(scope="module")
def etcd_cluster3() -> Iterator[EtcdCluster]:
    """Three members; tests that stop or kill members bring them back before they end."""
    cluster = EtcdCluster(3).start()
    yield cluster
    cluster.destroy()


@pytest.fixture(scope="module")
def etcd_tls() -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(1, tls=True).start()
    yield cluster
    cluster.destroy()


@pytest.fixture(scope="module")
def etcd_auth() -> Iterator[EtcdCluster]:
    """Auth enabled; simple tokens expire after 2 s of disuse, to exercise re-authentication."""
    cluster = EtcdCluster(1, auth=True, extra_args=["--auth-token", "simple", "--auth-token-ttl", "2"]).start()
    yield cluster
    cluster.destroy()
