"""A watch stream that goes silent while its member is fine: noticed, resumed, nothing lost.

The fault proxy freezes the open watch connection only (a NAT table or load balancer that forgot
it); the member answers status calls and new connections normally. Before the watch probed for
events it should have delivered, this hung forever: every idle check asked the member whether
it was alive, it said yes, and the mirror stayed stale. Quiet is still quiet: writes elsewhere
in the keyspace do not make a silent watch reconnect.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import structlog
from etcd_fixtures import EtcdCluster
from helpers import wait_until

from faults.fleet import proxy_to
from gpufleet.etcd import Delete, EtcdClient, Put, Snapshot, list_watch


async def test_a_silently_hung_watch_resumes_without_losing_or_repeating_a_change(
    etcd: EtcdCluster, tmp_path: Path
) -> None:
    proxy = proxy_to(etcd)
    changes: list[object] = []
    try:
        async with EtcdClient([proxy.url], timeout=2.0) as via_proxy, etcd.client() as direct:
            await direct.put("/hung/a", "1")

            async def consume() -> None:
                async for change in list_watch(via_proxy, "/hung/", idle_timeout=1.0):
                    changes.append(change)

            with structlog.testing.capture_logs() as logs:
                task = asyncio.create_task(consume())
                try:
                    await wait_until(lambda: changes, timeout=10, what="the snapshot")
                    assert isinstance(changes[0], Snapshot) and [kv.key for kv in changes[0].kvs] == [b"/hung/a"]
                    await wait_until(lambda: proxy.freeze_open_connections(b"/v3/watch"), timeout=10, what="a watch")

                    # Quiet: other keys change, ours do not; several idle checks pass, no reconnect.
                    for i in range(4):
                        await direct.put("/elsewhere/x", str(i))
                    checks = lambda: sum(e["event"] == "etcd watch idle, member alive" for e in logs)  # noqa: E731
                    await wait_until(lambda: checks() >= 2, timeout=20, what="two idle checks")
                    assert not [e for e in logs if e["event"] == "etcd list/watch failed; retrying"]
                    assert len(changes) == 1

                    # Now ours change while the stream is still frozen.
                    await direct.put("/hung/b", "2")
                    await direct.delete("/hung/a")
                    await direct.put("/hung/b", "3")
                    await wait_until(lambda: len(changes) >= 4, timeout=20, what="the changes, through a new watch")
                finally:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
        after = changes[1:]
        assert [type(c) for c in after] == [Put, Delete, Put], after
        assert (after[0].kv.key, after[0].kv.value) == (b"/hung/b", b"2")  # type: ignore[attr-defined]
        assert after[1].key == b"/hung/a"  # type: ignore[attr-defined]
        assert (after[2].kv.key, after[2].kv.value) == (b"/hung/b", b"3")  # type: ignore[attr-defined]
        hung = [e for e in logs if e["event"] == "etcd list/watch failed; retrying"]
        assert hung and "the stream is hung" in hung[0]["error"], hung
    finally:
        proxy.stop()
