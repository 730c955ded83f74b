"""Cluster policy in etcd (gpufleet/policyconfig.py, coordinator/policysync.py, gpuctl config).

Unit tests of validation, diff and the apply decision; then one end-to-end test with real etcd
and two real coordinators whose files disagree: both apply etcd's policy, `gpuctl config set`
changes it and the leader applies it (a route weight), an invalid value is refused with its
field path, a bad value in etcd is skipped, and a leader change keeps the policy.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import tomllib
from pathlib import Path

import msgspec
import pytest
from etcd_fixtures import EtcdCluster
from helpers import CoordinatorProcess, wait_until

from coordinator.config import load_config
from coordinator.policy.weights import WeightPolicy, instance_weight
from coordinator.policysync import PolicyState, step_policy
from gpufleet.keyspace import Keyspace, encode
from gpufleet.keyspace.records import GpuRecord, InstanceRecord, NodeRecord
from gpufleet.policyconfig import (
    ClusterPolicy,
    InvalidPolicy,
    decode_policy,
    diff,
    encode_policy,
    parse_assignment,
    policy_from_builtins,
    to_toml,
    with_assignments,
)
from gpufleet.routeslices import read_routes
from gpufleet.tomlconfig import ConfigError

# --- pure: validation, diff, the apply decision ------------------------------------------------


def _set(p: ClusterPolicy, *texts: str) -> ClusterPolicy:
    return with_assignments(p, [parse_assignment(t) for t in texts])


def test_set_validates_with_the_coordinators_structs_and_names_the_field() -> None:
    p = ClusterPolicy()
    q = _set(p, "health.eject_base_s=5", "weights.base.X1=7", "failover.cross_class=true")
    assert (q.health.eject_base_s, q.weights.base["X1"], q.failover.cross_class) == (5.0, 7, True)
    cases = {
        "health.eject_base_s=-1": "$.health.eject_base_s",
        "health.eject_base_s=soon": "$.health.eject_base_s",
        "health.nope=1": "$.health.nope",
        "routing.x=1": "$.routing.x",
        "degradation.thresholds=[0.3, 0.2, 0.1]": "$.degradation.thresholds",  # cross-field rule
        "failover.panic_threshold=2": "$.failover.panic_threshold",
    }
    for text, path in cases.items():
        with pytest.raises(InvalidPolicy) as e:
            _set(p, text)
        assert [x.path for x in e.value.problems] == [path], text
    for bad in ("health", "health.eject_base_s", "=1", "health..x=1"):
        with pytest.raises(ValueError):
            parse_assignment(bad)


def test_diff_lists_changed_fields_only_and_toml_round_trips() -> None:
    p = ClusterPolicy()
    q = _set(p, "health.eject_base_s=5", "weights.base.X1=7", "placement.enabled=false")
    q = msgspec.structs.replace(q, updated_by="someone", updated_at=1.0)  # authorship is not policy
    assert diff(p, q) == ["health.eject_base_s: 30 -> 5", "placement.enabled: true -> false", "weights.base.X1: - -> 7"]
    assert diff(q, q) == []
    again = policy_from_builtins(tomllib.loads(to_toml(q)))
    assert diff(q, again) == []
    assert decode_policy(encode_policy(q)) == q


def test_the_file_and_etcd_share_the_rules(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[etcd]\nendpoints = ["http://127.0.0.1:1"]\n[degradation]\nthresholds = [0.3, 0.2, 0.1]\n')
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert [p.path for p in e.value.problems] == ["$.degradation.thresholds"]
    f.write_text('[etcd]\nendpoints = ["http://127.0.0.1:1"]\n[health]\neject_base_s = 5\n')
    assert load_config(f).policy.health.eject_base_s == 5


def test_apply_decision() -> None:
    file = ClusterPolicy()
    s = PolicyState(file)
    assert step_policy(s, None, 0).absent
    v1 = _set(file, "weights.default_base=40")
    st = step_policy(s, encode_policy(v1), 7)
    assert st.state.revision == 7 and st.changes == ["weights.default_base: 100 -> 40"]
    assert step_policy(st.state, encode_policy(v1), 7).changes == []  # the same revision again: nothing
    bad = step_policy(st.state, b'{"health": {"eject_base_s": -1}}', 8)
    assert bad.invalid and "$.health.eject_base_s" in bad.invalid
    assert bad.state.policy == v1 and bad.state.revision == 7  # the last good stays
    assert step_policy(bad.state, b"not json", 8).changes == []  # judged once per revision
    assert step_policy(bad.state, b"{}", 9).changes == ["weights.default_base: 40 -> 100"]
    # Deleted: the leader writes back what applies, not its file's.
    gone = step_policy(st.state, None, 0)
    assert gone.absent and gone.state.policy == v1


# --- end to end: etcd, two coordinators, gpuctl ------------------------------------------------

CLUSTER = "policy"
KEYS = Keyspace(CLUSTER)


def _node() -> NodeRecord:
    now = time.time()
    return NodeRecord(
        node="n1",
        address="http://127.0.0.1:9",
        mode="cluster",
        agent_version="test",
        started_at=now,
        updated_at=now,
        gpu_source="simulated",
        gpu_classes=["X1"],  # no base weight: weighted as [weights] default_base
        gpus=[
            GpuRecord(index=0, uuid="GPU-1", name="X1", gpu_class="X1", utilization_percent=0, temperature_celsius=40)
        ],
        instances=[
            InstanceRecord(
                name="i1",
                model="m",
                backend="vllm",
                state="READY",
                state_since=now,
                port=9,
                gpus=[0],
                gpu_memory_fraction=0.9,
            )
        ],
        ready=True,
    )


async def _ctl(etcd: EtcdCluster, *argv: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gpuctl.main",
        "--etcd",
        ",".join(etcd.endpoints),
        "--cluster",
        CLUSTER,
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


def _logged(c: CoordinatorProcess, event: str) -> list[dict[str, object]]:
    out = []
    for line in c.log_lines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if event in str(doc.get("event", "")):
            out.append(doc)
    return out


async def test_coordinators_apply_the_clusters_policy(etcd: EtcdCluster, tmp_path: Path) -> None:
    node = _node()
    async with etcd.client() as client:
        await client.put(KEYS.node("n1"), encode(node))

        async def weight() -> int | None:
            r = (await read_routes(client, KEYS)).get("m")
            return r.endpoints[0].weight if r and r.endpoints else None

        def expect(default_base: int) -> int:
            return instance_weight(node, node.instances[0], WeightPolicy(default_base=default_base))

        c1 = CoordinatorProcess(tmp_path, "c1", etcd.endpoints, CLUSTER, "[weights]\ndefault_base = 40\n").start()
        c2 = CoordinatorProcess(tmp_path, "c2", etcd.endpoints, CLUSTER, "[weights]\ndefault_base = 90\n")
        try:
            c1.wait_ready_sync()
            # The first leader's file becomes the cluster's policy.
            await wait_until(lambda: c1.status()["is_leader"], 10, what="c1 leads")
            await wait_until(lambda: client.get(KEYS.config), 10, what="policy bootstrapped")
            await wait_until(lambda: _ok(weight(), expect(40)), 10, what="weight from default_base 40")
            # /v1/status names the revision of the policy applied, to compare with etcd's.
            boot = (await client.get(KEYS.config)).mod_revision
            await wait_until(lambda: _applied(c1, boot), 10, what="c1 shows the bootstrap's revision")
            assert "bootstrap" in c1.status()["policy"]["updated_by"]
            rc, out, _ = await _ctl(etcd, "config", "show")
            assert rc == 0 and "default_base = 40" in out
            # A second coordinator whose file disagrees applies the cluster's, and says so once.
            c2.start().wait_ready_sync()
            await wait_until(lambda: _logged(c2, "cluster policy from etcd applied"), 10, what="c2 applies etcd's")
            warned = _logged(c2, "[weights] in the file differs from the cluster's")
            assert len(warned) == 1, warned
            assert _logged(c2, "cluster policy from etcd applied")[0]["changes"] == ["weights.default_base: 90 -> 40"]

            # gpuctl config set: the leader applies it.
            rc, out, _ = await _ctl(etcd, "config", "set", "weights.default_base=70", "health.eject_base_s=5")
            assert rc == 0, out
            assert "weights.default_base: 40 -> 70" in out
            await wait_until(lambda: _ok(weight(), expect(70)), 10, what="weight from default_base 70")
            set_rev = (await client.get(KEYS.config)).mod_revision
            for c in (c1, c2):  # every replica applies it, the standby too
                await wait_until(lambda c=c: _applied(c, set_rev), 10, what=f"{c.ident} shows revision {set_rev}")
            for c in (c1, c2):  # logged field by field by every replica
                await wait_until(lambda c=c: _logged(c, "cluster policy changed"), 10, what=f"{c.ident} logs it")
                assert "weights.default_base: 40 -> 70" in _logged(c, "cluster policy changed")[-1]["changes"]
            # An invalid value is refused with its field path; nothing is written.
            before = (await client.get(KEYS.config)).mod_revision
            rc, _, err = await _ctl(etcd, "config", "set", "health.eject_base_s=-1")
            assert rc == gpuctl_config_dataerr() and "$.health.eject_base_s" in err, err
            rc, _, err = await _ctl(etcd, "config", "set", "health.eject_base_s")
            assert rc == 64, err
            assert (await client.get(KEYS.config)).mod_revision == before
            rc, out, _ = await _ctl(etcd, "-o", "json", "config", "history")
            hist = json.loads(out)
            assert [h["current"] for h in hist] == [True, False] and hist[0]["changes"] == [
                "health.eject_base_s: 30 -> 5",
                "weights.default_base: 40 -> 70",
            ]

            # A bad value in etcd is skipped by every replica; the last good policy stays.
            bad = (await client.put(KEYS.config, b'{"weights": {"default_base": -3}}')).revision
            await wait_until(lambda: _logged(c1, "invalid cluster policy"), 10, what="c1 skips it")
            await wait_until(lambda: _logged(c2, "invalid cluster policy"), 10, what="c2 skips it")
            for c in (c1, c2):  # the status says which value was skipped and which still applies
                assert c.status()["policy"]["skipped_revision"] == bad and _applied(c, set_rev)
            await client.put(KEYS.config, encode_policy(_set(ClusterPolicy(), "weights.default_base=70")))

            # A leader change does not change policy: c2 (file: 90) leads with the cluster's 70.
            c1.stop()
            await wait_until(lambda: c2.status()["is_leader"], 10, what="c2 leads")
            await wait_until(lambda: c2.status()["deciding_passes"] > 1, 10, what="c2 decides")
            assert await weight() == expect(70)
        finally:
            c1.stop()
            c2.stop()
            await client.delete_prefix(KEYS.prefix)


def _applied(c: CoordinatorProcess, revision: int) -> bool:
    return bool(c.status()["policy"]["revision"] == revision)


def gpuctl_config_dataerr() -> int:
    from gpuctl.cmd_config import EXIT_DATAERR

    return EXIT_DATAERR


async def _ok(got: object, want: int) -> bool:
    return await got == want  # type: ignore[misc]


async def test_edit_validates_and_writes_compare_on_revision(etcd: EtcdCluster) -> None:
    """`gpuctl config edit` with a scripted $EDITOR; a write from a stale read is refused."""
    from gpuctl.cmd_config import Conflict, _write

    keys = Keyspace("policy-edit")
    async with etcd.client() as client:
        await client.put(keys.config, encode_policy(ClusterPolicy()))

        async def edit(sed: str) -> tuple[int, str, str]:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                *("-m", "gpuctl.main", "--etcd", ",".join(etcd.endpoints), "--cluster", keys.cluster),
                *("config", "edit"),
                env={**os.environ, "EDITOR": f"sed -i '{sed}'", "VISUAL": ""},
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await proc.communicate()
            return proc.returncode or 0, out.decode(), err.decode()

        try:
            rc, out, err = await edit("s/^eject_base_s = 30.0$/eject_base_s = 7.0/")
            assert rc == 0 and "health.eject_base_s: 30 -> 7" in out, (out, err)
            kv = await client.get(keys.config)
            assert decode_policy(kv.value).health.eject_base_s == 7.0
            rc, out, err = await edit("s/^eject_base_s = 7.0$/eject_base_s = -1.0/")
            assert rc == 65 and "$.health.eject_base_s" in err and "nothing written" in err, (out, err)
            assert (await client.get(keys.config)).mod_revision == kv.mod_revision
            # The history keeps the replaced version.
            hist = await client.get_prefix(keys.config_history)
            assert [decode_policy(h.value).health.eject_base_s for h in hist.kvs] == [30.0]
            # A write based on a read that is no longer current changes nothing.
            await client.put(keys.config, encode_policy(ClusterPolicy()))
            with pytest.raises(Conflict):
                await _write(client, keys, kv, _set(ClusterPolicy(), "health.eject_base_s=9"))
            assert decode_policy((await client.get(keys.config)).value).health.eject_base_s == 30.0
        finally:
            await client.delete_prefix(keys.prefix)
