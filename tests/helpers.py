"""Shared test helpers: free ports, waiting on conditions with deadlines, running a real agent.

No fixed sleeps: every wait is "until this condition holds, or fail after a deadline", with a
short poll interval, so tests are as fast as the machine allows and still pass when it is loaded.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from gpufleet.tomlwrite import dumps as toml_dumps

TOKEN = "test-admin-token-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_until(
    cond: Callable[[], Awaitable[Any] | Any], timeout: float = 30.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll ``cond`` until it returns something truthy; fail with the last value after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = cond()
            if asyncio.iscoroutine(last) or isinstance(last, Awaitable):
                last = await last
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            last = e  # not there yet (connection refused, ...): keep waiting
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or cond}; last: {last!r}")
        await asyncio.sleep(interval)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes (it holds no GPU memory); it waits for its reaper.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


SIM_LAUNCHER_ARGV = ["{python}", "-m", "gpufleet_dev.simulated_server", "serve"]
SIM_LAUNCHER = '["{python}", "-m", "gpufleet_dev.simulated_server", "serve"]'  # the same, as TOML text

# The builders below write what they know from dicts through the one TOML writer (gpufleet.tomlwrite),
# so any value round-trips; the ``str`` parameters (gpus, args, extra, supervisor, instances) are TOML
# text the caller wrote, inserted as given.


def _toml_value(text: str) -> Any:
    import tomllib

    return tomllib.loads(f"v = {text}")["v"]


def instance_toml(
    name: str,
    *,
    gpus: str = "[]",
    fraction: float | None = None,
    args: str = "[]",
    extra: str = "",
    model: str | None = None,
) -> str:
    inst = {
        "name": name,
        "backend": "vllm",
        "launcher": SIM_LAUNCHER_ARGV,
        "model": model or name + "-model",
        "gpus": _toml_value(gpus),
        "gpu_memory_fraction": fraction,
        "args": _toml_value(args),
    }
    return "\n" + toml_dumps({"instances": [inst]}) + extra + "\n"


def agent_toml(
    tmp: Path, port: int, instances: str, *, token: bool = True, supervisor: str = "", gpus: str | None = None
) -> str:
    token_file = tmp / "admin-token"
    if token:
        token_file.write_text(TOKEN + "\n")
        token_file.chmod(0o600)
    if gpus is None:  # constant text (no values to escape), as [[gpu.simulated]] so a test may add more GPUs
        gpus = '\n[[gpu.simulated]]\nname = "NVIDIA A100-SXM4-80GB"\nmemory_total_gib = 80\n'
    agent = {
        "node_id": "test-node",
        "listen_port": port,
        "state_dir": tmp / "state",
        "log_dir": tmp / "logs",
        "admin_token_file": token_file if token else None,
        "log_format": "json",
        "log_level": "debug",
    }
    sup = {
        "probe_interval_s": 0.5,
        "probe_timeout_s": 0.4,
        "failure_threshold": 3,
        "backoff_initial_s": 0.2,
        "backoff_max_s": 2.0,
        "stop_grace_s": 5,
        "startup_timeout_s": 30,
        "port_base": free_port_block(),
    }
    return (
        "\n"
        + toml_dumps({"agent": agent, "gpu": {"source": "simulated"}})
        + gpus
        + "\n"
        + toml_dumps({"supervisor": sup})
        + supervisor
        + "\n"
        + instances
    )


def as_node(text: str, node: str, advertise_url: str | None = None, listen_host: str | None = None) -> str:
    """An ``agent_toml`` text for node ``node`` (reached at ``advertise_url``, listening on ``listen_host``)."""
    lines = [f'node_id = "{node}"']
    if advertise_url is not None:
        lines.append(f'advertise_url = "{advertise_url}"')
    if listen_host is not None:
        lines.append(f'listen_host = "{listen_host}"')
    return text.replace('node_id = "test-node"', "\n".join(lines))


def cluster_toml(
    endpoints: list[str],
    cluster: str,
    *,
    lease_ttl_s: int = 3,
    timeout_s: float = 1.0,
    telemetry_min_gap_s: float | None = None,
    extra: str = "",
) -> str:
    """The [cluster] section of a test agent: keep-alives every second, short deadlines."""
    section = {
        "endpoints": endpoints,
        "cluster": cluster,
        "lease_ttl_s": lease_ttl_s,
        "keepalive_interval_s": 1.0,
        "timeout_s": timeout_s,
        "telemetry_min_gap_s": telemetry_min_gap_s,
    }
    return "\n" + toml_dumps({"cluster": section}) + extra + "\n"


def free_port_block(span: int = 20) -> int:
    """A base port whose next ``span`` ports are free now (tests run agents side by side)."""
    for _ in range(200):
        base = free_port()
        if base + span > 65000:
            continue
        ok = True
        for p in range(base, base + span):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free port block")


class AgentProcess:
    """A real ``gpu-agent`` subprocess with a JSON log file and an HTTP client."""

    def __init__(
        self,
        tmp: Path,
        config_text: str,
        port: int,
        env: dict[str, str] | None = None,
        wrapper: list[str] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.tmp = tmp
        self.wrapper = wrapper or []  # e.g. unshare(1): run the agent in its own mount namespace
        self.port = port
        self.config = tmp / "agent.toml"
        self.config.write_text(config_text)
        self.log_path = tmp / "agent.log"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.base = f"http://{host}:{port}"  # another host: an agent in its own network namespace
        self.http: aiohttp.ClientSession | None = None

    def start(self) -> None:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*self.wrapper, sys.executable, "-m", "agent", "--config", str(self.config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )

    async def __aenter__(self) -> AgentProcess:
        self.start()
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        await wait_until(self._healthy, timeout=30, what="agent /healthz")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.http is not None:
            await self.http.close()
        self.stop()

    def stop(self) -> None:
        """SIGTERM (the graceful path under test), SIGKILL only if it hangs; close the log."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    async def _healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
        assert self.http is not None
        async with self.http.get(self.base + "/healthz") as r:
            return r.status == 200

    async def status(self) -> dict[str, Any]:
        assert self.http is not None
        async with self.http.get(self.base + "/v1/status") as r:
            assert r.status == 200
            return await r.json()

    async def instance(self, name: str) -> dict[str, Any]:
        """The instance's record; {} while it does not exist (e.g. before a reload lands)."""
        st = await self.status()
        return next((i for i in st["instances"] if i["name"] == name), {})

    async def wait_state(self, name: str, state: str, timeout: float = 30, **match: Any) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            i = await self.instance(name)
            if i.get("state") == state and all(i.get(k) == v for k, v in match.items()):
                return i
            return None

        return await wait_until(check, timeout=timeout, what=f"{name} {state} {match or ''}")

    async def admin(self, path: str, token: str | None = TOKEN, body: Any = None) -> tuple[int, dict[str, Any]]:
        assert self.http is not None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.http.post(self.base + path, headers=headers, json=body) as r:
            return r.status, await r.json()

    def log_lines(self) -> list[str]:
        return self.log_path.read_text().splitlines()


def start_agent_sync(
    tmp: Path,
    config_text: str,
    port: int,
    ready_instances: int,
    timeout: float = 60,
    wrapper: list[str] | None = None,
    host: str = "127.0.0.1",
) -> AgentProcess:
    """Start an agent from synchronous (module-scoped) fixtures and wait until ``ready_instances``
    instances are READY."""
    import json
    import urllib.request

    agent = AgentProcess(tmp, config_text, port, wrapper=wrapper, host=host)
    agent.start()
    deadline = time.monotonic() + timeout
    while True:
        assert agent.proc is not None
        if agent.proc.poll() is not None:
            raise AssertionError(f"agent exited with {agent.proc.returncode}:\n{agent.log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(agent.base + "/v1/status", timeout=2) as r:
                st = json.loads(r.read())
            if sum(i["state"] == "READY" for i in st["instances"]) >= ready_instances:
                return agent
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"agent not ready after {timeout}s")
        time.sleep(0.05)


class CoordinatorProcess:
    """A real ``gpu-coordinator`` subprocess (sync start/stop, for module-scoped fixtures)."""

    def __init__(
        self,
        tmp: Path,
        ident: str,
        endpoints: list[str],
        cluster: str,
        extra: str = "",
        wrapper: list[str] | None = None,
    ) -> None:
        self.tmp = tmp
        self.wrapper = wrapper or []  # e.g. env(1) with libfaketime: a coordinator with its own wall clock
        self.ident = ident
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        tmp.mkdir(parents=True, exist_ok=True)
        self.config = tmp / f"{ident}.toml"
        doc = {
            "coordinator": {
                "id": ident,
                "listen_port": self.port,
                "advertise_url": self.base,
                "log_format": "json",
                "log_level": "debug",
                "sample_interval_s": 0.5,
            },
            "etcd": {"endpoints": endpoints, "cluster": cluster, "timeout_s": 1.0},
            "election": {"lease_ttl_s": 3, "renew_deadline_s": 2.0, "retry_period_s": 0.5, "grace_s": 1.0},
        }
        self.config.write_text("\n" + toml_dumps(doc) + extra + "\n")
        self.log_path = tmp / f"{ident}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> CoordinatorProcess:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*self.wrapper, sys.executable, "-m", "coordinator", "--config", str(self.config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        return self

    def wait_ready_sync(self, timeout: float = 30) -> CoordinatorProcess:
        """Until /readyz says 200: state synced from etcd and a leader known (itself or another)."""
        import urllib.request

        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"coordinator exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(self.base + "/readyz", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"coordinator {self.ident} not ready after {timeout}s")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self._log.close()

    def status(self) -> dict[str, Any]:
        import json as _json
        import urllib.request

        with urllib.request.urlopen(self.base + "/v1/status", timeout=5) as r:
            return _json.loads(r.read())

    def log_lines(self) -> list[str]:
        return self.log_path.read_text().splitlines() if self.log_path.exists() else []


class NotifySocket:
    """systemd's end of ``NOTIFY_SOCKET``: a thread collects a service's sd_notify datagrams in
    order (the kernel queues only a few datagrams; undrained, the service's sends would stall).
    Descriptors sent along are closed; a subclass that keeps them overrides :meth:`received`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                data, anc, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(64 * 4))
            except OSError:
                return
            fds: list[int] = []
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds += list(array.array("i", payload[: len(payload) - len(payload) % 4]))
            with self.lock:
                self.messages.append(data.decode())
                self.received(data.decode(), fds)

    def received(self, message: str, fds: list[int]) -> None:
        """One datagram (called with ``lock`` held)."""
        for fd in fds:
            os.close(fd)

    def ready_after_reload(self, n: int = 1) -> str | None:
        """The first READY=1 after the ``n``-th RELOADING=1, once both arrived."""
        with self.lock:
            msgs = list(self.messages)
        starts = [i for i, m in enumerate(msgs) if "RELOADING=1" in m.splitlines()]
        if len(starts) < n:
            return None
        return next((m for m in msgs[starts[n - 1] + 1 :] if "READY=1" in m.splitlines()), None)

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
