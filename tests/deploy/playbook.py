"""The project's own ``ansible/deploy.yml`` run against the booted containers, unchanged.

``Playbook`` writes an inventory for the fleet (ssh as root with this run's key and known host
keys, no sudo: ``gpufleet_become: false``), a vars file pointing the roles at the local apt
repository and wheelhouse, and runs ``ansible-playbook``; ``play()`` returns the recap per host.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nspawn

from gpufleet_dev.fleetconfig import SIM_LAUNCHER_ARGV

ANSIBLE_DIR = nspawn.ROOT / "ansible"
BIN = Path(sys.executable).parent
RECAP = re.compile(
    r"^(?P<host>\S+)\s*:\s*ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+unreachable=(?P<unreachable>\d+)\s+"
    r"failed=(?P<failed>\d+)\s+skipped=(?P<skipped>\d+)\s+rescued=(?P<rescued>\d+)\s+ignored=(?P<ignored>\d+)",
    re.M,
)

ETCD_PASSWORD = "gpufleet-deploy-secret"
ETCD_ROOT_PASSWORD = "root-deploy-secret"
MODEL = "qwen2.5-7b"


@dataclass
class Recap:
    """One ansible-playbook run: the PLAY RECAP counters by host, and its whole output."""

    hosts: dict[str, dict[str, int]]
    output: str
    seconds: float
    returncode: int

    def changed(self) -> dict[str, int]:
        return {h: c["changed"] for h, c in self.hosts.items()}

    def failed(self) -> dict[str, int]:
        return {h: c["failed"] + c["unreachable"] for h, c in self.hosts.items() if c["failed"] or c["unreachable"]}

    def changed_tasks(self) -> list[str]:
        """'changed: [host]' lines with the task they belong to (to say what was not idempotent)."""
        out, task = [], ""
        for line in self.output.splitlines():
            if line.startswith(("TASK [", "RUNNING HANDLER [")):
                task = line.split("[", 1)[1].rsplit("]", 1)[0]
            elif line.startswith("changed: "):
                out.append(f"{task}: {line}")
        return out


def ansible_env(workdir: Path, **more: str) -> dict[str, str]:
    """The environment every test's ``ansible-playbook`` runs in: the project's ansible.cfg, its
    temporary files under ``workdir``, no colours, this virtualenv's tools first; ``more`` on top."""
    env = dict(os.environ)
    env.update(
        ANSIBLE_CONFIG=str(ANSIBLE_DIR / "ansible.cfg"),
        ANSIBLE_LOCAL_TEMP=str(workdir / "ansible-tmp"),
        ANSIBLE_NOCOLOR="1",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        **more,
    )
    return env


def simulated_vars(**qwen: Any) -> dict[str, Any]:
    """The fleet every test deployment runs, in inventory variables: one simulated A100 and the
    simulated vLLM server ``qwen-a`` serving MODEL on it (``qwen``: more of that instance's
    fields). The one place for them: the booted-hosts tests and the local-root test both start here."""
    instance = {
        "name": "qwen-a",
        "backend": "vllm",
        "launcher": SIM_LAUNCHER_ARGV,
        "model": "/mnt/models/Qwen2.5-7B-Instruct",
        "served_model_name": MODEL,
        "gpus": [0],
        "gpu_memory_fraction": 0.4,
        **qwen,
    }
    return {
        "gpufleet_gpu_source": "simulated",
        "gpufleet_agent_simulated_gpus": [{"name": "NVIDIA A100-SXM4-80GB", "memory_total_gib": 80}],
        "gpufleet_agent_instances": [instance],
        "gpufleet_agent_settings": {"supervisor": {"startup_timeout_s": 120}},
    }


def default_vars(workdir: Path, wheel: Path) -> dict[str, Any]:
    """Inventory variables of the test deployment: simulated GPUs and vLLM servers, the local
    package sources, a short watchdog so the watchdog test does not wait 30 s + abort."""
    return {
        "gpufleet_become": False,  # we log in as root; the hosts have no sudo
        "gpufleet_cluster": "deploy",
        "gpufleet_pki_dir": str(workdir / "pki"),
        "gpufleet_package_wheel": str(wheel),
        "gpufleet_pip_extra_args": f"--no-index --find-links {nspawn.WHEELS_MOUNT}",
        "gpufleet_etcd_password": ETCD_PASSWORD,
        "gpufleet_etcd_root_password": ETCD_ROOT_PASSWORD,
        **simulated_vars(args=["--tokens-per-second", "200"]),
        "gpufleet_agent_ready_timeout_s": 300,
        "gpufleet_agent_unit_overrides": {"WatchdogSec": 15},
    }


@dataclass
class Playbook:
    fleet: nspawn.Fleet
    groups: Mapping[str, Sequence[str]]  # inventory group -> container names
    workdir: Path
    variables: dict[str, Any] = field(default_factory=dict)
    runs: list[tuple[str, Recap]] = field(default_factory=list)

    @property
    def inventory(self) -> Path:
        return self.workdir / "inventory.ini"

    def write_inventory(self) -> None:
        ssh_args = " ".join(
            [
                "-F /dev/null",
                "-o IdentitiesOnly=yes",
                f"-o UserKnownHostsFile={self.fleet.known_hosts}",
                "-o StrictHostKeyChecking=yes",
            ]
        )
        lines = []
        for group, names in self.groups.items():
            lines.append(f"[{group}]")
            for n in names:
                c = self.fleet.containers[n]
                lines.append(
                    f"{n} ansible_host={c.address} ansible_user=root ansible_python_interpreter=/usr/bin/python3 "
                    f"ansible_ssh_private_key_file={self.fleet.key} "
                    f"ansible_ssh_common_args={shlex.quote(ssh_args)}"
                )
            lines.append("")
        self.inventory.write_text("\n".join(lines))

    def env(self) -> dict[str, str]:
        return ansible_env(
            self.workdir,
            ANSIBLE_SSH_CONTROL_PATH_DIR=str(self.workdir / "ansible-cp"),
            ANSIBLE_PIPELINING="True",
            ANSIBLE_FORCE_COLOR="0",
            ANSIBLE_DISPLAY_SKIPPED_HOSTS="False",
        )

    def play(
        self,
        extra_vars: Mapping[str, Any] | None = None,
        *,
        label: str = "",
        limit: str | None = None,
        args: Sequence[str] = (),
        check: bool = True,
        timeout: float = 1200,
    ) -> Recap:
        """Run ``ansible-playbook -i <inventory> deploy.yml`` with this deployment's variables,
        ``extra_vars`` on top (e.g. another ``gpufleet_package_wheel``); the recap by host. With
        ``check`` (the default) a failed or unreachable host fails the calling test with the
        playbook's output."""
        label = label or f"run {len(self.runs) + 1}"
        variables = {**self.variables, **(extra_vars or {})}
        vars_file = self.workdir / f"vars-{len(self.runs) + 1}.json"
        vars_file.write_text(json.dumps(variables, indent=2))
        argv = [
            str(BIN / "ansible-playbook"),
            "-i",
            str(self.inventory),
            "deploy.yml",
            "-e",
            f"@{vars_file}",
            *(["--limit", limit] if limit else []),
            *args,
        ]
        t0 = time.monotonic()
        res = subprocess.run(
            argv,
            cwd=ANSIBLE_DIR,
            env=self.env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        seconds = time.monotonic() - t0
        out = res.stdout + ("\n" + res.stderr if res.stderr else "")
        log = self.workdir / f"playbook-{len(self.runs) + 1}.log"
        log.write_text(f"$ {shlex.join(argv)}\n{out}")
        hosts = {
            m["host"]: {k: int(v) for k, v in m.groupdict().items() if k != "host"} for m in RECAP.finditer(res.stdout)
        }
        recap = Recap(hosts, out, seconds, res.returncode)
        self.runs.append((label, recap))
        if check and (res.returncode != 0 or not hosts or recap.failed()):
            raise AssertionError(
                f"{label}: ansible-playbook exited {res.returncode} (log {log}), "
                f"failed: {recap.failed()}\n{out[-10000:]}"
            )
        return recap
