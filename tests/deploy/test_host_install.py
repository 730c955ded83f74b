"""The README's host install ("Running an agent on a GPU host"), run as written on a bare host.

The lines between the README's ``host-install:begin`` and ``host-install:end`` markers are the
test's script, so the document and the test cannot drift apart. They run as root over ssh on one
booted Debian 12 container of its own (the cached minbase image of tests/deploy/nspawn.py, not
one of the deployment's hosts, which Ansible has already set up), whose package sources are the
site's: apt from the local repository, and pip from an /etc/pip.conf naming the wheelhouse and
a wheel of this checkout (``pip install gpufleet`` then finds this version, with no internet).

The one step that is the operator's own is editing ``agent.toml``: the test writes a config
with a simulated A100 and a simulated vLLM server into it at that point, after checking that
the step before printed the shipped example. Then the rest of the steps run as written, and the
agent must come up READY under systemd as the service user, answer ``/v1/status`` from another
host, accept the admin token it was given (the token is readable by it), and serve a chat
completion with the API key the README's ``gpuctl keys create`` printed, refusing one without it.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import nspawn
import pytest
from conftest import skip_or_fail

from gpufleet import tomlwrite
from gpufleet.apikeys import KEY_PREFIX, well_formed

pytestmark = [pytest.mark.deploy, pytest.mark.timeout(900)]

README = nspawn.ROOT / "README.md"
BEGIN, END = "<!-- host-install:begin", "<!-- host-install:end -->"
EDIT_AFTER = "> agent.toml"  # the step that writes the example the operator then edits
HOST = "gf-host"
PORT = 8080
DIST_MOUNT = "/srv/gpufleet/dist"


def readme_steps() -> tuple[str, str]:
    """The README's host-install block, split after the step that writes agent.toml."""
    text = README.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1, f"{README}: one {BEGIN} ... {END} block"
    block = text.split(BEGIN, 1)[1].split(END, 1)[0]
    code = block.split("```bash\n", 1)[1].rsplit("```", 1)[0]
    lines = code.splitlines(keepends=True)
    (cut,) = [i for i, line in enumerate(lines) if EDIT_AFTER in line.split("#", 1)[0]]
    return "".join(lines[: cut + 1]), "".join(lines[cut + 1 :])


def simulated_config(address: str) -> str:
    """What the operator's edit makes of the example: this host's GPU and model server, here a
    simulated A100 and a simulated vLLM server (the host has neither driver nor vLLM)."""
    return tomlwrite.dumps(
        {
            "agent": {
                "node_id": HOST,
                "listen_host": "0.0.0.0",
                "listen_port": PORT,
                "advertise_url": f"http://{address}:{PORT}",
                "admin_token_file": "/etc/gpu-agent/admin-token",
            },
            "auth": {"mode": "keys", "keys_file": "/etc/gpu-agent/keys.json"},  # as the example has it
            "gpu": {"source": "simulated", "simulated": [{"name": "NVIDIA A100-SXM4-80GB", "memory_total_gib": 80}]},
            "supervisor": {"startup_timeout_s": 120},
            "instances": [
                {
                    "name": "qwen-a",
                    "backend": "vllm",
                    "launcher": ["{python}", "-m", "gpufleet_dev.simulated_server", "serve"],
                    "model": "/mnt/models/Qwen2.5-7B-Instruct",
                    "served_model_name": "qwen2.5-7b",
                    "gpus": [0],
                    "gpu_memory_fraction": 0.4,
                    "port": 8000,
                }
            ],
        },
        comment="examples/vllm-two-instances.toml, edited for a host with a simulated GPU",
    )


@dataclass
class BareHost:
    fleet: nspawn.Fleet

    @property
    def address(self) -> str:
        return self.fleet.containers[HOST].address

    def script(self, text: str, timeout: float = 600) -> str:
        """Shell lines as root in root's home, stopping at the first that fails; their output."""
        res = self.fleet.ssh(HOST, "bash -euo pipefail -s", input=text, check=False, timeout=timeout)
        out = f"stdout: {res.stdout[-3000:]}\nstderr: {res.stderr[-3000:]}"
        assert res.returncode == 0, f"exit {res.returncode} from:\n{text}\n{out}"
        return res.stdout

    def sh(self, command: str) -> str:
        return self.fleet.ssh(HOST, command).stdout

    def http(self, path: str, method: str = "GET", token: str | None = None, body: object = None) -> tuple[int, object]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://{self.address}:{PORT}{path}", data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            try:
                return e.code, json.loads(e.read() or b"null")
            except ValueError:
                return e.code, None
        except OSError:
            return 0, None


@pytest.fixture(scope="module")
def bare_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BareHost]:
    reason = nspawn.why_not()
    if reason is not None:
        skip_or_fail(reason)
    workdir = tmp_path_factory.mktemp("host-install")
    artifacts = nspawn.artifacts()
    wheel = nspawn.build_wheel(workdir)
    # A tag and subnet of its own: the deployment's fleet may be up in the same session.
    tag = f"{os.getpid() % 0x1000:03x}h"
    fleet = nspawn.Fleet(workdir, artifacts, [HOST], subnet=f"10.252.{os.getpid() % 250}", tag=tag)
    try:
        try:
            fleet.up()
        except (AssertionError, RuntimeError) as e:
            skip_or_fail(f"systemd-nspawn cannot boot the test host here: {e}")
        # The site's pip index, as a provisioned host would have it configured.
        merged = fleet.containers[HOST].merged
        (merged / DIST_MOUNT.lstrip("/")).mkdir(parents=True)
        shutil.copy(wheel, merged / DIST_MOUNT.lstrip("/") / wheel.name)
        (merged / "etc/pip.conf").write_text(
            f"[global]\nno-index = true\nfind-links =\n    {nspawn.WHEELS_MOUNT}\n    {DIST_MOUNT}\n"
        )
        yield BareHost(fleet)
    finally:
        fleet.destroy()


def test_the_readme_host_install_works_on_a_bare_host(bare_host: BareHost) -> None:
    h = bare_host
    until_edit, after_edit = readme_steps()
    assert h.sh("test -e /etc/gpu-agent || echo absent; id gpu-agent 2>/dev/null || echo no-user").split() == [
        "absent",
        "no-user",
    ]

    h.script(until_edit)
    shipped = (nspawn.ROOT / "examples/vllm-two-instances.toml").read_text()
    assert h.sh("cat agent.toml") == shipped
    h.fleet.ssh(HOST, "cat > agent.toml", input=simulated_config(h.address))
    printed = h.script(after_edit)
    # The API key the README made: its secret, printed once by gpuctl keys create.
    (secret,) = [w for w in printed.split() if w.startswith(KEY_PREFIX) and well_formed(w)]

    def ready() -> bool:
        props = h.sh("systemctl show gpu-agent -p ActiveState -p SubState -p NRestarts")
        return "ActiveState=active" in props and h.http("/readyz")[0] == 200

    nspawn.wait_for(ready, 120, "gpu-agent active (READY=1) with its instance READY", interval=0.5)
    unit = dict(
        line.split("=", 1)
        for line in h.sh("systemctl show gpu-agent -p User -p NRestarts -p StatusText -p MainPID").splitlines()
    )
    assert unit["User"] == "gpu-agent" and unit["NRestarts"] == "0" and unit["StatusText"], unit
    pid = int(unit["MainPID"])
    assert h.sh(f"stat -c %U /proc/{pid}").strip() == "gpu-agent"
    assert "/opt/gpufleet/venv/bin/gpu-agent" in h.sh(f"tr '\\0' ' ' < /proc/{pid}/cmdline")

    code, status = h.http("/v1/status")
    assert code == 200 and isinstance(status, dict), status
    assert status["node"] == HOST and status["ready"], status
    assert [(i["name"], i["state"]) for i in status["instances"]] == [("qwen-a", "READY")], status

    # The admin token is the agent's to read: the admin API takes it, and refuses a wrong one.
    token = h.sh("cat /etc/gpu-agent/admin-token").strip()
    assert h.http("/admin/reload", "POST", token)[0] == 200
    assert h.http("/admin/reload", "POST", "wrong")[0] == 401
    modes = h.sh(
        "stat -c '%n %U:%G %a' /etc/gpu-agent /etc/gpu-agent/admin-token /etc/gpu-agent/agent.toml "
        "/etc/gpu-agent/keys.json"
    )
    assert modes.split("\n")[:4] == [
        "/etc/gpu-agent root:gpu-agent 750",
        "/etc/gpu-agent/admin-token gpu-agent:gpu-agent 600",
        "/etc/gpu-agent/agent.toml root:gpu-agent 640",
        "/etc/gpu-agent/keys.json root:gpu-agent 640",
    ]

    # The OpenAI API takes the key the README made, and refuses a request without one (401 in
    # OpenAI's error shape) or with another.
    chat = {"model": "qwen2.5-7b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    code, reply = h.http("/v1/chat/completions", "POST", secret, chat)
    assert code == 200 and isinstance(reply, dict) and reply["choices"][0]["message"]["content"], (code, reply)
    for token in (None, "gpf_not-a-key"):
        code, refused = h.http("/v1/chat/completions", "POST", token, chat)
        assert code == 401 and isinstance(refused, dict), (token, code, refused)
        assert refused["error"]["message"] and refused["error"]["type"], refused
