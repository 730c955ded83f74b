"""Real etcd processes on loopback: single members and clusters, optionally with TLS and auth;
snapshots, restores and wipes as an operator does them.

Members run on free loopback ports (or given ones) with their data under a base directory, with
fast raft timings (heartbeat 50 ms, election 500 ms) so elections and leader loss take about a
second, pre-vote on, and watch progress notifications every second. Start-up waits on
``/health`` (which also needs a leader) with a deadline; ``destroy()`` SIGKILLs whatever is left
and removes the data directories it created.

``GPUFLEET_ETCD_BIN`` picks another etcd build (e.g. a 3.5 release) to run the same code against.
Used by the tests (tests/etcd_fixtures.py wraps it in fixtures), the demo and the benchmarks.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import ssl
import subprocess
import tempfile
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path
from typing import Any

from gpufleet.etcd import EtcdClient, EtcdError

from .fleetbase import Daemon, FleetError, free_port, wait_for, wait_until
from .localtls import TlsFiles, make_tls

ETCD_BIN = os.environ.get("GPUFLEET_ETCD_BIN") or shutil.which("etcd")
NO_ETCD = "no etcd binary on PATH (scripts/bootstrap installs Debian's etcd-server; CI does too)"

ROOT_PASSWORD = "root-test-password"
USER = "gpufleet"
USER_PASSWORD = "gpufleet-test-password"
USER_PREFIX = "/gpufleet/"


class NoEtcd(FleetError):
    """No etcd binary to run: the tests skip, the demo says how to install one."""


_help_text: str | None = None


def _etcd_help() -> str:
    """``etcd --help``, read once: which flags this build knows."""
    global _help_text
    if _help_text is None:
        _help_text = ""
        if ETCD_BIN is not None:
            r = subprocess.run([ETCD_BIN, "--help"], capture_output=True, text=True, timeout=30)
            _help_text = r.stdout + r.stderr
    return _help_text


class EtcdMember(Daemon):
    """One etcd process. ``start()`` needs the cluster's ``--initial-cluster`` string the first time."""

    stop_timeout = 10.0

    def __init__(
        self,
        name: str,
        base: Path,
        *,
        tls: TlsFiles | None = None,
        extra_args: list[str] | None = None,
        client_port: int | None = None,
        peer_port: int | None = None,
        new_session: bool = False,
    ):
        super().__init__(base / f"{name}.log", new_session=new_session)
        self.name = name
        self.data_dir = base / name
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.tls = tls
        self.extra_args = list(extra_args or [])
        # Where it listens, and a command prefix: a partition test puts a member in a network
        # namespace (``ip netns exec NS``) with its client and peer traffic on separate links.
        self.client_host = "127.0.0.1"
        self.peer_host = "127.0.0.1"
        self.cluster_token = f"gpufleet-local-{os.getpid()}"
        self._initial_cluster = ""

    @property
    def prefix(self) -> list[str]:
        return self.wrapper

    @prefix.setter
    def prefix(self, value: list[str]) -> None:
        self.wrapper = list(value)

    @property
    def client_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.client_host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.peer_host}:{self.peer_port}"

    def argv(self) -> list[str]:
        if ETCD_BIN is None:
            raise NoEtcd(NO_ETCD)
        args = [
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
        if "--pre-vote" in _etcd_help():
            # As ansible deploys it (and etcd 3.5+ defaults to): a member coming back from a
            # partition does not force an election on the healthy majority.
            args += ["--pre-vote=true"]
        if "--experimental-watch-progress-notify-interval" in _etcd_help():
            args += ["--experimental-watch-progress-notify-interval", "1s"]
        if self.tls:
            args += [
                "--cert-file", self.tls.server_cert,
                "--key-file", self.tls.server_key,
                "--trusted-ca-file", self.tls.ca,
                "--client-cert-auth",
            ]  # fmt: skip
        return args + self.extra_args

    def start(self, initial_cluster: str | None = None) -> EtcdMember:
        """Start the process (again, on the same data directory and ports, after stop/kill)."""
        if initial_cluster is not None:
            self._initial_cluster = initial_cluster
        elif not self._initial_cluster:
            self._initial_cluster = f"{self.name}={self.peer_url}"  # a member on its own
        super().start()
        return self

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        ctx = ssl.create_default_context(cafile=self.tls.ca)
        ctx.load_cert_chain(self.tls.client_cert, self.tls.client_key)
        return ctx

    _ssl_context = ssl_context  # the name the tests used

    def healthy_sync(self) -> bool:
        """``/health`` says true: the member serves and has a leader."""
        self.check()
        try:
            with urllib.request.urlopen(self.client_url + "/health", timeout=2, context=self.ssl_context()) as r:
                return json.loads(r.read()).get("health") == "true"
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def wait_healthy_sync(self, timeout: float = 30.0) -> None:
        try:
            wait_for(self.healthy_sync, timeout, f"etcd {self.name} healthy")
        except FleetError as e:
            if self.running():  # an exit already says so, with the log tail
                raise FleetError(f"etcd {self.name} not healthy after {timeout}s:\n{self.log_tail()}") from e
            raise

    async def wait_healthy(self, timeout: float = 30.0) -> None:
        await wait_until(self.healthy_sync, timeout=timeout, what=f"etcd {self.name} healthy")

    def restart(self) -> None:
        """Stop if running, start again on the same data directory; wait with wait_healthy()."""
        self.stop()
        self.start()


class EtcdCluster:
    """1 or 3 members; optionally TLS (client certificates required) and auth (root + gpufleet user).

    ``base``: where the data directories and logs go (default: a temporary directory, removed by
    ``destroy()``). ``first_port``: member ``i`` listens for clients on ``first_port + 2i`` and
    for peers on the port after it (default: free ports)."""

    def __init__(
        self,
        size: int = 1,
        *,
        tls: bool = False,
        auth: bool = False,
        extra_args: list[str] | None = None,
        base: Path | None = None,
        first_port: int | None = None,
        new_session: bool = False,
    ) -> None:
        if ETCD_BIN is None:
            raise NoEtcd(NO_ETCD)
        self._own_base = base is None
        self.base = base or Path(tempfile.mkdtemp(prefix="gpufleet-etcd-"))
        self.base.mkdir(parents=True, exist_ok=True)
        self.tls = make_tls(self.base / "tls") if tls else None
        self.auth = auth

        def ports(i: int) -> dict[str, int | None]:
            if first_port is None:
                return {"client_port": None, "peer_port": None}
            return {"client_port": first_port + 2 * i, "peer_port": first_port + 2 * i + 1}

        self.members = [
            EtcdMember(f"m{i}", self.base, tls=self.tls, extra_args=extra_args, new_session=new_session, **ports(i))
            for i in range(size)
        ]

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

    async def lead_elsewhere(self, member: EtcdMember, timeout: float = 15.0) -> EtcdMember:
        """Until a running member other than ``member`` is the raft leader (handing leadership over
        with etcd's MoveLeader when ``member`` holds it); returns the leader.

        A fault meant for a follower must hit a follower: which member leads after an election is
        chance, and freezing the leader is another fault: a frozen leader that resumes may revoke
        every lease (etcd issue 15247; Debian bookworm's 3.4.23 has it in full, PR 16822
        mitigates it)."""

        async def elsewhere() -> EtcdMember | None:
            leader = await self.raft_leader()
            if leader is not member:
                return leader  # None while an election runs: asked again
            target = next(m for m in self.members if m is not member and m.running())
            async with self.client(endpoints=[target.client_url], timeout=1.0) as c:
                target_id = (await c.status(endpoint=target.client_url)).member_id
            with contextlib.suppress(FleetError):  # raced with an election: asked again
                self.admin("/v3/maintenance/transfer-leadership", {"targetID": str(target_id)}, member=member)
            return None

        leader: EtcdMember = await wait_until(elsewhere, timeout=timeout, what=f"raft leadership off {member.name}")
        return leader

    @property
    def initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    def start(self, timeout: float = 30.0) -> EtcdCluster:
        for m in self.members:
            m._initial_cluster = self.initial_cluster
        try:
            self._start_all(timeout)
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
        etcdctl(member, "snapshot", "save", str(path))
        return path

    def restore(self, snapshot: Path, timeout: float = 30.0) -> None:
        """Stop every member, ``etcdctl snapshot restore`` each one's data directory from
        ``snapshot`` (same names, peer URLs and cluster token), start them again: the store
        goes back to the snapshot's keys, leases and revision."""
        for m in self.members:
            m.stop()
        initial = self.initial_cluster
        for m in self.members:
            shutil.rmtree(m.data_dir, ignore_errors=True)
            etcdctl(
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

    def admin(
        self, path: str, body: dict[str, Any], token: str | None = None, member: EtcdMember | None = None
    ) -> dict[str, Any]:
        """POST to ``member``'s gateway (default: the first running member's); raises with etcd's
        error text."""
        member = member or next(m for m in self.members if m.running())
        req = urllib.request.Request(
            member.client_url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **({"Authorization": token} if token else {})},
        )
        try:
            with urllib.request.urlopen(req, timeout=10, context=member.ssl_context()) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise FleetError(f"etcd {path}: {e.code} {e.read()[:300]!r}") from e

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


def etcdctl(member: EtcdMember, *args: str, endpoint: bool = True) -> None:
    """Run etcdctl (v3 API) against ``member``; raises with its output when it fails."""
    exe = shutil.which("etcdctl")
    if exe is None:
        raise FleetError("etcdctl not on PATH (Debian's etcd-client package)")
    argv = [exe, *(["--endpoints", member.client_url] if endpoint else []), *args]
    if member.tls and endpoint:
        argv += ["--cacert", member.tls.ca, "--cert", member.tls.client_cert, "--key", member.tls.client_key]
    res = subprocess.run(argv, env={**os.environ, "ETCDCTL_API": "3"}, capture_output=True, timeout=60)
    if res.returncode != 0:
        raise FleetError(f"etcdctl {' '.join(args)}: {res.stdout[-500:]!r} {res.stderr[-1500:]!r}")
