"""``gpuctl demo``: a whole gpufleet cluster on this machine, with simulated GPUs.

    etcd (the system's binary)                      one member, data in .demo/cluster/etcd
    gpu-coordinator c1, c2                          leader election, weights, routes
    gpu-agent gpu-a100-1, gpu-a100-2, gpu-h100-1    simulated GPUs, simulated vLLM servers

It prints the cluster status and the endpoints, serves until Ctrl-C (or ``--duration``), then
stops every process it started (each in its own process group). ``--chaos N`` SIGKILLs the
first A100 agent after N seconds and prints how the routes move to the other A100.
``--standalone`` runs the single-agent demo (examples/standalone-demo.toml) instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from gpufleet import tomlwrite

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = REPO_ROOT / ".demo" / "cluster"
CLUSTER = "demo"
AGENTS = {  # node -> (GPU name, models served)
    "gpu-a100-1": ("NVIDIA A100-SXM4-80GB", ["qwen2.5-7b", "bge-m3"]),
    "gpu-a100-2": ("NVIDIA A100-SXM4-80GB", ["qwen2.5-7b"]),
    "gpu-h100-1": ("NVIDIA H100 80GB HBM3", ["qwen2.5-7b", "llama-3.1-70b"]),
}


class Processes:
    """Everything the demo started, stopped in reverse order whatever happens."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "ab") as log:
            p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((name, p))
        return p

    def stop_all(self) -> None:
        for _, p in reversed(self.procs):
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 45
        for _, p in reversed(self.procs):
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()


class StopFlag:
    """Ctrl-C / SIGTERM ask the demo to stop; the demo then stops what it started."""

    def __init__(self) -> None:
        self.set = False
        signal.signal(signal.SIGINT, self._on)
        signal.signal(signal.SIGTERM, self._on)

    def _on(self, *_: object) -> None:
        self.set = True

    def serve(self, procs: Processes, duration: float, every: Callable[[float], None] | None = None) -> None:
        """Until stopped, ``duration`` passes (0 = forever) or a process dies."""
        started = time.monotonic()
        while not self.set and (not duration or time.monotonic() - started < duration):
            if any(p.poll() is not None for _, p in procs.procs):
                break
            if every is not None:
                every(time.monotonic() - started)
            time.sleep(0.2)


def run_standalone_demo(config: Path, duration: float, show_status: Callable[[str], None]) -> int:
    """One agent, no etcd: examples/standalone-demo.toml."""
    from agent.config import load_config
    from gpufleet.facts import EX_USAGE
    from gpufleet.tomlconfig import ConfigError

    try:
        cfg = load_config(config)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return EX_USAGE
    logs = Path(cfg.agent.log_dir)
    logs.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{cfg.agent.listen_port}"
    procs = Processes(logs)
    stop = StopFlag()
    print(f"starting gpu-agent with {config} (log: {logs / 'agent.log'})", flush=True)
    try:
        procs.start("agent", [sys.executable, "-m", "agent", "--config", str(config)])
        _wait("the agent ready", lambda: stop.set or _get(url + "/readyz")[0] == 200, 90, procs)
        show_status(url)
        print(
            f"""
Agent API:   {url}/v1/status   {url}/metrics   {url}/readyz      Proxy: {url}/v1
Admin token: {cfg.agent.admin_token_file}
Try:         curl -s {url}/v1/models
             kill -9 <a PID above>   # and watch it come back: gpuctl status --agent {url}
Ctrl-C stops the agent and every model server it started.""",
            flush=True,
        )
        stop.serve(procs, duration)
        return 0
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        procs.stop_all()
        code = procs.procs[0][1].returncode if procs.procs else None
        print(f"gpu-agent stopped (exit {code})", flush=True)


def _get(url: str, timeout: float = 2.0) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, {}
    except (OSError, ValueError):
        return 0, {}


def _wait(what: str, cond, timeout: float, procs: Processes) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, p in procs.procs:
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode}; see {procs.logs / (name + '.log')}")
        if cond():
            return
        time.sleep(0.2)
    raise RuntimeError(f"timed out waiting for {what}")


def _agent_config(node: str, gpu: str, models: list[str], port: int, etcd: str, workdir: Path) -> str:
    launcher = ["{python}", "-m", "gpufleet_dev.simulated_server", "serve"]
    instances = [
        {
            "name": m.split(".")[0],
            "backend": "vllm",
            "launcher": launcher,
            "model": f"/mnt/models/{m}",
            "served_model_name": m,
            "gpus": [i],
            "gpu_memory_fraction": 0.8,
            "args": ["--startup-delay", "1", "--tokens-per-second", "40"],
        }
        for i, m in enumerate(models)
    ]
    gpus = [
        {"name": gpu, "memory_total_gib": 80, "temperature_c": 48 + 3 * i, "utilization_percent": 20 + 10 * i}
        for i in range(len(models) + 1)  # + a spare GPU for replicas the leader places
    ]
    doc = {
        "agent": {
            "node_id": node,
            "listen_port": port,
            "advertise_url": f"http://127.0.0.1:{port}",
            "state_dir": workdir / "state",
            "log_dir": workdir / "logs",
            "admin_token_file": DEMO_DIR / "admin-token",
            "log_format": "json",
        },
        "gpu": {"source": "simulated", "simulated": gpus},
        "supervisor": {"port_base": port + 100 + 10 * (port % 10), "port_span": 10},
        "cluster": {"endpoints": [etcd], "cluster": CLUSTER, "telemetry_min_gap_s": 2},
        "models": {"launchers": {"vllm": launcher}, "allowed_roots": [DEMO_DIR / "models"]},
        "instances": instances,
    }
    return tomlwrite.dumps(doc, "generated by gpuctl demo")


def _coordinator_config(ident: str, port: int, etcd: str) -> str:
    doc = {
        "coordinator": {
            "id": ident,
            "listen_port": port,
            "advertise_url": f"http://127.0.0.1:{port}",
            "log_format": "json",
            "sample_interval_s": 2,
        },
        "etcd": {"endpoints": [etcd], "cluster": CLUSTER},
        "election": {"lease_ttl_s": 6, "renew_deadline_s": 4, "retry_period_s": 1, "grace_s": 3},
        "health": {"eject_base_s": 5},
    }
    return tomlwrite.dumps(doc, "generated by gpuctl demo")


def run_cluster_demo(base_port: int, duration: float, chaos: float | None, status_fn) -> int:  # type: ignore[no-untyped-def]
    etcd_bin = shutil.which("etcd")
    if etcd_bin is None:
        print("error: no etcd binary on PATH; run ./scripts/bootstrap (or gpuctl demo --standalone)", file=sys.stderr)
        return 1
    if DEMO_DIR.exists():
        shutil.rmtree(DEMO_DIR)
    (DEMO_DIR / "logs").mkdir(parents=True)
    token = DEMO_DIR / "admin-token"
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(os.urandom(24).hex() + "\n")
    procs = Processes(DEMO_DIR / "logs")
    etcd = f"http://127.0.0.1:{base_port}"
    stop = StopFlag()
    try:
        print(f"starting etcd on {etcd}", flush=True)
        procs.start(
            "etcd",
            [
                etcd_bin,
                "--name",
                "demo",
                "--data-dir",
                str(DEMO_DIR / "etcd"),
                "--listen-client-urls",
                etcd,
                "--advertise-client-urls",
                etcd,
                "--listen-peer-urls",
                f"http://127.0.0.1:{base_port + 1}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{base_port + 1}",
                "--initial-cluster",
                f"demo=http://127.0.0.1:{base_port + 1}",
            ],
        )
        _wait("etcd", lambda: _get(etcd + "/health")[0] == 200, 30, procs)
        agent_ports = {}
        for i, (node, (gpu, models)) in enumerate(AGENTS.items()):
            port = base_port + 10 + i
            agent_ports[node] = port
            workdir = DEMO_DIR / node
            workdir.mkdir()
            cfg = workdir / "agent.toml"
            cfg.write_text(_agent_config(node, gpu, models, port, etcd, workdir))
            print(f"starting gpu-agent {node} on :{port} ({gpu.split()[1]} x{len(models)})", flush=True)
            procs.start(node, [sys.executable, "-m", "agent", "--config", str(cfg)])
        for i, ident in enumerate(("c1", "c2")):
            cfg = DEMO_DIR / f"{ident}.toml"
            cfg.write_text(_coordinator_config(ident, base_port + 20 + i, etcd))
            print(f"starting gpu-coordinator {ident} on :{base_port + 20 + i}", flush=True)
            procs.start(ident, [sys.executable, "-m", "coordinator", "--config", str(cfg)])
        for node, port in agent_ports.items():
            _wait(f"{node} ready", lambda p=port: _get(f"http://127.0.0.1:{p}/readyz")[0] == 200, 90, procs)

        def routes_ready() -> bool:
            return any(_get(f"http://127.0.0.1:{base_port + 20 + i}/v1/status")[1].get("is_leader") for i in range(2))

        _wait("a leader", routes_ready, 60, procs)
        _register_demo_model(etcd, procs)
        time.sleep(4)  # the leader's grace period, then its first routes and placement
        print()
        status_fn(etcd)
        entry = agent_ports["gpu-a100-2"]
        others = f":{agent_ports['gpu-a100-1']}, :{agent_ports['gpu-h100-1']}"
        print(
            f"""
Proxy (any agent):  http://127.0.0.1:{entry}/v1   (OpenAI API; also {others})
  curl -s http://127.0.0.1:{entry}/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{{"model": "llama-3.1-70b", "messages": [{{"role": "user", "content": "hi"}}]}}'
  (gpu-a100-2 has no llama: it forwards to the node that has, by weight)
Cluster:            .venv/bin/gpuctl --etcd {etcd} --cluster {CLUSTER} status
Models:             .venv/bin/gpuctl --etcd {etcd} --cluster {CLUSTER} models list
  (qwen2-7b is registered on "shared storage" with 2 replicas; the leader placed them)
etcd keyspace:      ETCDCTL_API=3 etcdctl --endpoints {etcd} get --prefix --keys-only /gpufleet/
Admin token:        {token}      Logs: {procs.logs}/
Ctrl-C stops every process the demo started.""",
            flush=True,
        )
        chaos_done = chaos is None

        def maybe_chaos(elapsed: float) -> None:
            nonlocal chaos_done
            if chaos_done or elapsed < chaos:  # type: ignore[operator]
                return
            chaos_done = True
            victim = next(p for n, p in procs.procs if n == "gpu-a100-1")
            print("\nchaos: SIGKILL gpu-a100-1 (its model servers die with it)", flush=True)
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait()
            procs.procs = [(n, p) for n, p in procs.procs if p is not victim]
            t0 = time.monotonic()
            _wait_route_down(etcd, "gpu-a100-1", 30)
            took = time.monotonic() - t0
            print(
                f"chaos: gpu-a100-1 DOWN in the routes after {took:.1f}s; its traffic goes to "
                "gpu-a100-2 (same class), never to the H100\n",
                flush=True,
            )
            status_fn(etcd)

        stop.serve(procs, duration, maybe_chaos)
        return 0
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        print("\nstopping the demo cluster ...", flush=True)
        procs.stop_all()
        print("all demo processes stopped", flush=True)


def _register_demo_model(etcd: str, procs: Processes) -> None:
    """Put a model on the demo's "shared storage" and register it: the leader places it."""
    import subprocess

    store = DEMO_DIR / "models"
    store.mkdir(exist_ok=True)
    (store / "qwen2-7b.gguf").write_bytes(b"GGUF" + os.urandom(4096))
    argv = [sys.executable, "-m", "gpuctl.main", "--etcd", etcd, "--cluster", CLUSTER, "models", "add"]
    argv += ["qwen2-7b", "--path", str(store / "qwen2-7b.gguf"), "--replicas", "2", "--min-vram-gib", "16"]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    print(res.stdout.strip() or res.stderr.strip(), flush=True)


def _wait_route_down(etcd: str, node: str, timeout: float) -> None:
    import asyncio

    from gpufleet.etcd import EtcdClient
    from gpufleet.keyspace import Keyspace, decode_or_skip
    from gpufleet.keyspace.records import RouteRecord

    async def check() -> None:
        keys = Keyspace(CLUSTER)
        async with EtcdClient([etcd]) as c:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                for kv in (await c.get_prefix(keys.routes)).kvs:
                    r = decode_or_skip(kv.key_str, kv.value, RouteRecord, kv.mod_revision)
                    if r and any(e.node == node and e.state == "DOWN" for e in r.endpoints):
                        return
                await asyncio.sleep(0.2)

    asyncio.run(check())
