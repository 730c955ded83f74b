"""A registered model's path on a hung mount (a dead NFS/CephFS server): the agent reports the
path unavailable, keeps serving, and still exits promptly on SIGTERM.

Before: the path checks ran in a thread pool, whose non-daemon threads are joined at interpreter
exit, so one check stuck in the mount kept the agent from exiting at all (systemd waited its
90 s stop timeout, then SIGKILLed it). The hung mount is a FUSE file system that is mounted but
never served (hungmount.py), in the agent's own mount namespace.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from etcd_fixtures import EtcdCluster
from helpers import agent_toml, as_node, cluster_toml, free_port, start_agent_sync, wait_until

from faults.fleet import CLUSTER, KEYS, agent_status
from gpufleet.keyspace import encode
from gpufleet.keyspace.records import ModelRecord

EXIT_BOUND_S = 5.0
CAN_MOUNT = os.geteuid() == 0 and shutil.which("unshare") is not None and os.path.exists("/dev/fuse")


@pytest.mark.skipif(not CAN_MOUNT, reason="needs root, unshare(1) and /dev/fuse")
async def test_agent_exits_promptly_with_a_path_check_stuck_on_a_hung_mount(etcd: EtcdCluster, tmp_path: Path) -> None:
    mnt = tmp_path / "models"
    mnt.mkdir()
    port = free_port()
    text = as_node(agent_toml(tmp_path, port, ""), "hung", f"http://127.0.0.1:{port}")
    text += cluster_toml(etcd.endpoints, CLUSTER)
    text += f'\n[models]\nallowed_roots = ["{mnt}"]\nrecheck_interval_s = 1.0\ncheck_timeout_s = 1.0\n'
    wrapper = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        sys.executable,
        str(Path(__file__).parent / "hungmount.py"),
        str(mnt),
    ]
    async with etcd.client() as c:
        await c.put(KEYS.model("qwen"), encode(ModelRecord(name="qwen", path=f"{mnt}/qwen.gguf")))
    agent = await asyncio.to_thread(start_agent_sync, tmp_path, text, port, 0, wrapper=wrapper)
    assert agent.proc is not None
    try:
        # The check hangs in the kernel; past its deadline the path is reported unavailable.
        def reported() -> dict[str, object] | None:
            models = agent_status(agent.base)["models"]
            return next((m for m in models if m["model"] == "qwen" and m["available"] is False), None)

        m = await wait_until(reported, timeout=10, what="the hung path reported unavailable")
        assert "did not finish in 1s" in str(m["error"]), m
        assert agent_status(agent.base)["cluster"]["state"] == "registered"  # serving on meanwhile

        agent.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        try:
            rc = await asyncio.to_thread(agent.proc.wait, 2 * EXIT_BOUND_S)
        except subprocess.TimeoutExpired:
            rc = None
        took = time.monotonic() - t0
        print(f"hung mount: agent exited {took:.2f} s after SIGTERM (rc {rc})")
        assert rc == 0 and took < EXIT_BOUND_S, f"agent still running {took:.1f} s after SIGTERM"
    finally:
        if agent.proc.poll() is None:
            agent.proc.kill()  # the stuck thread is in a killable wait: SIGKILL ends it and the mount
            agent.proc.wait()
        agent.stop()
    assert "Traceback" not in agent.log_path.read_text()
