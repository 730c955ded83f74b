"""The targets of bench/proxy.py: gpu-agent, nginx, vllm-router and LiteLLM, each started pinned
to one core and pointed at the backends; process CPU, RSS and pinning read from /proc.

The agent supervises the three backends as its instances (models ``sim``, ``canned``, ``sse``);
every other target is pointed at the same backend processes, so all of them serve the same
bytes. The peers come from PyPI, each in a virtualenv of its own outside the clone, keyed by
version (``~/.cache/gpufleet-bench/<name>-<version>/``), created on first use; a peer that cannot
be installed or started is reported with the reason and the run goes on without it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from _common import cpu_seconds, free_port

from gpufleet import tomlwrite
from gpufleet_dev.fleetbase import Daemon
from gpufleet_dev.localfleet import AgentProcess, FleetError, free_port_block

BACKENDS = ("sim", "canned", "sse", "sse-slow")  # model names: the agent's instances, LiteLLM's model_list
PEERS = {  # name: (version, pip requirement). litellm 1.108+ needs `litellm-proxy`, not on PyPI
    "vllm-router": ("0.1.17", "vllm-router=={v}"),
    "litellm": ("1.106.12", "litellm[proxy]=={v}"),
    # Not a peer: the compiler bench/proxy_compiled.py builds the agent's data path with.
    "cython": ("3.1.8", "cython=={v}"),
}
CACHE = Path(os.environ.get("GPUFLEET_BENCH_CACHE", Path.home() / ".cache" / "gpufleet-bench"))
HERE = Path(__file__).resolve().parent


class Unavailable(Exception):
    """A target that cannot be installed or started; the message says why."""


# ---------------------------------------------------------------- /proc


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def pin(pids: list[int], cpu: int) -> None:
    """Pin every thread of these processes (sched_setaffinity on a pid moves one thread only)."""
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                os.sched_setaffinity(int(tid), {cpu})
            except OSError:
                pass


def affinity(pids: list[int]) -> list[str]:
    """The distinct CPU lists the threads of these processes may run on (one entry: pinned)."""
    seen = set()
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                seen.add(",".join(map(str, sorted(os.sched_getaffinity(int(tid))))))
            except OSError:
                pass
    return sorted(seen)


def cpu(pids: list[int]) -> float:
    total = 0.0
    for p in pids:
        try:
            total += cpu_seconds(p)
        except OSError:
            pass
    return total


def rss(pids: list[int]) -> int:
    """Resident bytes of these processes (VmRSS)."""
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def listen_overflows() -> int:
    """TcpExtListenOverflows: connections dropped because a listen queue was full (any socket)."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            return int(dict(zip(names.split()[1:], values.split()[1:], strict=True))["ListenOverflows"])
    return 0


def wait_port(port: int, proc: Daemon, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            proc.check()
        except FleetError as e:
            raise Unavailable(str(e)[-1500:]) from None
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise Unavailable(f"{proc.name}: port {port} not open after {timeout:.0f} s\n{proc.log_tail(1500)}")


# ---------------------------------------------------------------- targets


class Command(Daemon):
    """A peer proxy: one command line, its own session (stop reaches its worker processes)."""

    def __init__(self, name: str, argv: list[str], log: Path, cpu: int, env: dict[str, str] | None = None) -> None:
        super().__init__(log, wrapper=["taskset", "-c", str(cpu)], env=env, new_session=True)
        self.name = name
        self._argv = argv

    def argv(self) -> list[str]:
        return self._argv


@dataclass
class Target:
    name: str
    urls: dict[str, str]  # backend -> base URL through this target
    procs: dict[str, list[int]]  # backend -> processes whose CPU and RSS are the proxy's
    version: str = ""
    daemons: list[Daemon] = field(default_factory=list)

    def stop(self) -> None:
        for d in self.daemons:
            d.stop(20)


def start_agent(
    tmp: Path, cpu: int, backend_cpu: int, rates: tuple[float, float]
) -> tuple[AgentProcess, Target, dict[str, str]]:
    """gpu-agent with the backends as its instances (``rates``: events/s of ``sse`` and
    ``sse-slow``); returns it as a target and the backends' direct URLs (the agent's children,
    re-pinned to ``backend_cpu``)."""
    port = free_port()
    py = ["{python}"]
    instances = [
        {
            "name": "sim",
            "backend": "vllm",
            "launcher": [*py, "-m", "gpufleet_dev.simulated_server", "serve"],
            "model": "sim",
            "args": ["--tokens-per-second", "0", "--disable-uvicorn-access-log"],
        },
        {
            "name": "canned",
            "backend": "vllm",
            "launcher": [*py, str(HERE / "proxy_backends.py"), "canned"],
            "model": "canned",
            "args": ["--tmp", str(tmp / "canned")],
        },
        {
            "name": "sse",
            "backend": "vllm",
            "launcher": [*py, str(HERE / "proxy_backends.py"), "sse"],
            "model": "sse",
            "args": ["--events-per-second", f"{rates[0]:g}"],
        },
        {
            "name": "sse-slow",
            "backend": "vllm",
            "launcher": [*py, str(HERE / "proxy_backends.py"), "sse"],
            "model": "sse-slow",
            "args": ["--events-per-second", f"{rates[1]:g}"],
        },
    ]
    doc = {
        "agent": {"listen_port": port, "state_dir": tmp / "state", "log_dir": tmp / "logs", "log_format": "json"},
        "gpu": {"source": "simulated", "simulated": [{"name": "NVIDIA A100-SXM4-80GB"}]},
        "supervisor": {"port_base": free_port_block(len(instances)), "port_span": len(instances)},
        "instances": instances,
    }
    agent = AgentProcess(tmp, tomlwrite.dumps(doc), port, wrapper=["taskset", "-c", str(cpu)])
    agent.start()
    try:
        agent.wait_ready_sync(len(instances), timeout=90)
    except FleetError as e:
        agent.stop()
        raise SystemExit(f"agent not ready: {e}") from None
    status = agent.status_sync()["instances"]
    direct = {i["name"]: f"http://127.0.0.1:{i['port']}" for i in status}
    for i in status:  # the backends inherited the proxy's core from the agent
        pin(descendants(i["pid"]), backend_cpu)
    version = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout
    target = Target(
        "gpu-agent",
        {b: f"http://127.0.0.1:{port}" for b in BACKENDS},
        {b: [agent.pid] for b in BACKENDS},
        version=f"commit {version.strip()}",
    )
    return agent, target, direct


def start_nginx(tmp: Path, cpu: int, direct: dict[str, str]) -> Target:
    """nginx as a streaming LLM gateway should be configured: HTTP/1.1 upstream keep-alive,
    ``proxy_buffering off``, access log on (as ours); one worker, one server block per backend."""
    if not shutil.which("nginx"):
        raise Unavailable("nginx not installed (apt-get install -y nginx-light)")
    ports = {b: free_port() for b in direct}
    blocks = []
    for b, url in direct.items():
        blocks.append(f"""
  upstream {b} {{ server {url.removeprefix("http://")}; keepalive 1024; }}
  server {{
    listen 127.0.0.1:{ports[b]} backlog=4096;
    location / {{
      proxy_pass http://{b};
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_read_timeout 600s;
    }}
  }}""")
    d = tmp / "nginx"
    d.mkdir()
    conf = d / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
worker_rlimit_nofile 65536;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 16384; }}
http {{
  access_log {d}/access.log;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  client_max_body_size 32m;
  keepalive_requests 10000000;
  {"".join(blocks)}
}}
""")
    nginx = Command("nginx", [shutil.which("nginx") or "nginx", "-p", str(d), "-c", str(conf)], d / "out.log", cpu)
    nginx.start()
    for p in ports.values():
        wait_port(p, nginx, 10)
    # the master listens before it forks its worker: wait for the worker, whose CPU is the proxy's
    deadline = time.monotonic() + 10
    while len(descendants(nginx.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    version = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip().split("/")[-1]
    return Target(
        "nginx",
        {b: f"http://127.0.0.1:{p}" for b, p in ports.items()},
        {b: descendants(nginx.pid) for b in direct},
        version=version,
        daemons=[nginx],
    )


def peer_venv(name: str) -> tuple[Path, str]:
    """The peer's virtualenv, created on first use (python3 -m venv + pip): (path, version)."""
    version, req = PEERS[name]
    venv = CACHE / f"{name}-{version}"
    if (venv / ".complete").exists():
        return venv, version
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    log = CACHE / f"{name}-{version}.log"
    try:
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
        with open(log, "wb") as out:
            subprocess.run(
                [str(venv / "bin" / "pip"), "install", "-q", req.format(v=version)],
                check=True,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=1800,
            )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
        raise Unavailable(f"installing {req.format(v=version)} into {venv} failed: {e}; {' | '.join(tail)}") from None
    (venv / ".complete").touch()
    return venv, version


def start_vllm_router(tmp: Path, cpu: int, direct: dict[str, str]) -> Target:
    """vLLM's Rust router, one per backend (it routes by worker, not by model), round robin over
    a static worker list of one."""
    venv, version = peer_venv("vllm-router")
    urls, procs, daemons = {}, {}, []
    try:
        for b, url in direct.items():
            port = free_port()
            argv = [str(venv / "bin" / "vllm-router"), "--host", "127.0.0.1", "--port", str(port)]
            argv += ["--worker-urls", url, "--policy", "round_robin", "--prometheus-port", str(free_port())]
            r = Command(f"vllm-router-{b}", argv, tmp / f"vllm-router-{b}.log", cpu)
            r.start()
            daemons.append(r)
            wait_port(port, r, 60)
            urls[b], procs[b] = f"http://127.0.0.1:{port}", descendants(r.pid)
    except BaseException:
        for d in daemons:
            d.stop(10)
        raise
    return Target("vllm-router", urls, procs, version=version, daemons=daemons)


def start_litellm(tmp: Path, cpu: int, direct: dict[str, str]) -> Target:
    """LiteLLM's proxy as a plain OpenAI-compatible router: one ``openai/`` model per backend,
    no database, no keys, no callbacks; one worker."""
    venv, version = peer_venv("litellm")
    lines = ["model_list:"]
    for b, url in direct.items():
        lines += [
            f"  - model_name: {b}",
            "    litellm_params:",
            f"      model: openai/{b}",
            f"      api_base: {url}/v1",
            "      api_key: none",
        ]
    lines += ["litellm_settings:", "  drop_params: true", "  telemetry: false"]
    conf = tmp / "litellm.yaml"
    conf.write_text("\n".join(lines) + "\n")
    port = free_port()
    env = {
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of the cost map from GitHub at start
        "LITELLM_TELEMETRY": "False",
        "LITELLM_LOG": "ERROR",
        # No keys, as every other target here: since 1.10x it refuses to start without a master
        # key unless told that this is on purpose.
        "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true",
    }
    argv = [str(venv / "bin" / "litellm"), "--config", str(conf), "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--num_workers", "1"]
    proc = Command("litellm", argv, tmp / "litellm.log", cpu, env=env)
    proc.start()
    try:
        wait_port(port, proc, 120)
    except BaseException:
        proc.stop(10)
        raise
    return Target(
        "litellm",
        {b: f"http://127.0.0.1:{port}" for b in direct},
        {b: descendants(proc.pid) for b in direct},
        version=version,
        daemons=[proc],
    )


def start_floor(tmp: Path, cpu: int, direct: dict[str, str]) -> Target:
    """bench/proxy_floor.py's flat relay with every level's features, as a server: not a proxy
    (whole JSON requests and answers only: the ``sim`` and ``canned`` backends), the ceiling a
    Python relay with the data path's features reaches in this harness."""
    backends = [b for b in ("sim", "canned") if b in direct]
    ports = {b: free_port() for b in backends}
    argv = [sys.executable, str(HERE / "proxy_floor.py"), "serve", *(f"{ports[b]}={direct[b]}" for b in backends)]
    floor = Command("floor", argv, tmp / "floor.log", cpu)
    floor.start()
    for p in ports.values():
        wait_port(p, floor, 30)
    return Target(
        "floor",
        {b: f"http://127.0.0.1:{p}" for b, p in ports.items()},
        {b: [floor.pid] for b in backends},
        version="bench/proxy_floor.py level 9",
        daemons=[floor],
    )


STARTERS = {"floor": start_floor, "nginx": start_nginx, "vllm-router": start_vllm_router, "litellm": start_litellm}
