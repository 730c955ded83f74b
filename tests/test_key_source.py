"""The agent's key set (agent/keys/source.py) against real etcd: a revocation reaches the agent
within 2 s; with etcd down the last set stays (keys keep working, revocations stay revoked); an
agent restarted while etcd is down starts from its cache; a bad record refuses its key; a
standalone keys file is read at start and on reload."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from etcd_fixtures import EtcdCluster
from helpers import wait_until

from agent.keys.source import CACHE_NAME, EtcdKeySource, FileKeySource, KeysFileError
from gpufleet.apikeys import Denial, KeysFile, new_secret, secret_record
from gpufleet.keyspace import Keyspace, encode
from gpufleet.keyspace.records import ApiKeyRecord

CLUSTER = "ks"


@pytest.fixture
def etcd_own() -> Iterator[EtcdCluster]:
    """A member of the test's own: the test kills it."""
    cluster = EtcdCluster(1).start()
    yield cluster
    cluster.destroy()


def make_key(name: str) -> tuple[ApiKeyRecord, str]:
    secret = new_secret()
    now = time.time()
    return ApiKeyRecord(name=name, created_at=now, secrets=[secret_record(secret, now)]), secret


def denial(source: EtcdKeySource | FileKeySource, secret: str) -> Denial | str | None:
    if source.index is None:
        return "no key set"
    return source.index.check(secret, "m", time.time()).denial


async def test_revocation_reaches_the_agent_fast_and_survives_an_outage_and_a_restart(
    etcd_own: EtcdCluster, tmp_path: Path
) -> None:
    keys = Keyspace(CLUSTER)
    alice, alice_secret = make_key("alice")
    bob, bob_secret = make_key("bob")
    async with etcd_own.client(timeout=5) as etcd:
        await etcd.put(keys.api_key("alice"), encode(alice))
        await etcd.put(keys.api_key("bob"), encode(bob))
        source = EtcdKeySource(etcd, keys, tmp_path)
        assert source.index is None  # nothing known yet: requests get 503, not a free pass
        await source.start()
        try:
            await source.wait_current(10)
            assert source.origin == "etcd"
            assert denial(source, alice_secret) is None and denial(source, bob_secret) is None

            revoked_at = time.monotonic()
            await etcd.put(keys.api_key("bob"), encode(msgspec.structs.replace(bob, revoked_at=time.time())))
            await wait_until(lambda: denial(source, bob_secret) is Denial.REVOKED, 2, what="revocation seen")
            propagation = time.monotonic() - revoked_at
            assert propagation < 2

            # A record that does not decode refuses its key (it may have been meant as a revocation).
            carol, carol_secret = make_key("carol")
            await etcd.put(keys.api_key("carol"), encode(carol))
            await wait_until(lambda: denial(source, carol_secret) is None, 5, what="carol known")
            await etcd.put(keys.api_key("carol"), b'{"name": "carol", "secrets": "garbage"}')
            await wait_until(lambda: denial(source, carol_secret) is Denial.UNKNOWN, 5, what="bad record refused")
            assert denial(source, alice_secret) is None

            etcd_own.members[0].kill()  # etcd gone: the last set stays in force
            assert denial(source, alice_secret) is None and denial(source, bob_secret) is Denial.REVOKED
        finally:
            await source.stop()

        # An agent restarted while etcd is down starts from its cache, revocations included.
        assert (tmp_path / CACHE_NAME).stat().st_mode & 0o777 == 0o600
        assert alice_secret not in (tmp_path / CACHE_NAME).read_text()
        restarted = EtcdKeySource(etcd, keys, tmp_path)
        assert restarted.origin == "cache"
        assert denial(restarted, alice_secret) is None
        assert denial(restarted, bob_secret) is Denial.REVOKED
        assert denial(restarted, carol_secret) is Denial.UNKNOWN


def test_a_standalone_agent_reads_its_keys_file_at_start_and_on_reload(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    with pytest.raises(KeysFileError, match="cannot read"):
        FileKeySource(path)
    alice, alice_secret = make_key("alice")
    path.write_bytes(msgspec.json.encode(KeysFile(keys=[alice])))
    source = FileKeySource(path)
    assert denial(source, alice_secret) is None

    bob, bob_secret = make_key("bob")
    path.write_bytes(msgspec.json.encode(KeysFile(keys=[alice, bob])))
    source.reload()
    assert denial(source, bob_secret) is None

    path.write_text("{not json")  # a broken file on reload: the set in force stays
    source.reload()
    assert denial(source, alice_secret) is None and denial(source, bob_secret) is None
    with pytest.raises(KeysFileError, match="not a keys file"):
        FileKeySource(path)
