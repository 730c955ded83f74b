"""Configs of a local fleet's agents and coordinators, written through the one TOML writer
(gpufleet.tomlwrite) from dicts, so any value round-trips.

The defaults are those of a fleet under test: fast probes and back-off, keep-alives every second,
short etcd deadlines, debug JSON logs, and a known admin token (:data:`TOKEN`). The ``str``
parameters of the builders (gpus, args, extra, supervisor, instances) are TOML text the caller
wrote, inserted as given.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from gpufleet.tomlwrite import dumps as toml_dumps

from .fleetbase import free_port_block

TOKEN = "test-admin-token-0123456789abcdef"

SIM_LAUNCHER_ARGV = ["{python}", "-m", "gpufleet_dev.simulated_server", "serve"]
SIM_LAUNCHER = '["{python}", "-m", "gpufleet_dev.simulated_server", "serve"]'  # the same, as TOML text


def _toml_value(text: str) -> Any:
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
    """One ``[[instances]]`` table: a simulated vLLM server."""
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
    """A standalone agent (node ``test-node``) on ``port`` with its state under ``tmp``; with
    ``token``, ``tmp/admin-token`` holds :data:`TOKEN`."""
    token_file = tmp / "admin-token"
    if token:
        token_file.write_text(TOKEN + "\n")
        token_file.chmod(0o600)
    if gpus is None:  # constant text (no values to escape), as [[gpu.simulated]] so a caller may add more GPUs
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
    fields: dict[str, Any] = {"node_id": node, "advertise_url": advertise_url, "listen_host": listen_host}
    return text.replace('node_id = "test-node"', toml_dumps(fields).strip())


def cluster_toml(
    endpoints: list[str],
    cluster: str,
    *,
    lease_ttl_s: int = 3,
    timeout_s: float = 1.0,
    telemetry_min_gap_s: float | None = None,
    extra: str = "",
) -> str:
    """The [cluster] section of a local agent: keep-alives every second, short deadlines."""
    section = {
        "endpoints": endpoints,
        "cluster": cluster,
        "lease_ttl_s": lease_ttl_s,
        "keepalive_interval_s": 1.0,
        "timeout_s": timeout_s,
        "telemetry_min_gap_s": telemetry_min_gap_s,
    }
    return "\n" + toml_dumps({"cluster": section}) + extra + "\n"


def coordinator_doc(ident: str, port: int, endpoints: list[str], cluster: str) -> dict[str, Any]:
    """A local coordinator's config as a dict: samples every 0.5 s, a 3 s election lease."""
    base = f"http://127.0.0.1:{port}"
    return {
        "coordinator": {
            "id": ident,
            "listen_port": port,
            "advertise_url": base,
            "log_format": "json",
            "log_level": "debug",
            "sample_interval_s": 0.5,
        },
        "etcd": {"endpoints": endpoints, "cluster": cluster, "timeout_s": 1.0},
        "election": {"lease_ttl_s": 3, "renew_deadline_s": 2.0, "retry_period_s": 0.5, "grace_s": 1.0},
    }
