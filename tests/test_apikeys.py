"""API keys: the secret format, the decision table (gpufleet/apikeys.py), and ``gpuctl keys``
against real etcd and against a standalone keys file."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import msgspec
import pytest
from etcd_fixtures import EtcdCluster
from hypothesis import given
from hypothesis import strategies as st

from gpufleet.apikeys import (
    KEY_PREFIX,
    SECRET_LEN,
    Denial,
    KeyIndex,
    KeysFile,
    digest,
    new_secret,
    parse_duration,
    presented_key,
    redact,
    rotated,
    secret_record,
    well_formed,
)
from gpufleet.keyspace import Keyspace, decode
from gpufleet.keyspace.records import ApiKeyRecord

NOW = 1_800_000_000.0
CLUSTER = "keys"


def key(name: str = "k", secret: str | None = None, **fields: object) -> tuple[ApiKeyRecord, str]:
    secret = secret or new_secret()
    rec = ApiKeyRecord(name=name, created_at=NOW - 10, secrets=[secret_record(secret, NOW - 10)])
    return msgspec.structs.replace(rec, **fields), secret


# ---------------------------------------------------------------------------------------------
# the secret


def test_secrets_are_long_distinct_and_recognisable() -> None:
    made = {new_secret() for _ in range(200)}
    assert len(made) == 200
    for s in made:
        assert s.startswith(KEY_PREFIX) and len(s) == SECRET_LEN and well_formed(s)


def test_a_typo_or_a_truncation_fails_the_checksum() -> None:
    s = new_secret()
    i = len(KEY_PREFIX) + 5
    typo = s[:i] + ("a" if s[i] != "a" else "b") + s[i + 1 :]
    assert not well_formed(typo)
    assert not well_formed(s[:-1])
    assert not well_formed("sk-" + s[3:])
    assert not well_formed(s + " ")


@given(st.text(max_size=80))
def test_well_formed_never_raises(text: str) -> None:
    well_formed(text)
    redact(text)


def test_redaction_shows_at_most_prefix_and_last_four() -> None:
    s = new_secret()
    assert redact(s) == f"{KEY_PREFIX}…{s[-4:]}"
    assert s[8:-4] not in redact(s)
    assert redact("short") == "…"


@pytest.mark.parametrize(
    ("authorization", "x_api_key", "expected"),
    [
        ("Bearer abc", None, "abc"),
        ("bearer   abc  ", None, "abc"),
        (None, "abc", "abc"),
        ("Bearer abc", "xyz", "abc"),
        ("Basic dXNlcjpwdw==", "xyz", "xyz"),
        ("Bearer ", None, None),
        (None, "  ", None),
        (None, None, None),
    ],
)
def test_the_presented_key(authorization: str | None, x_api_key: str | None, expected: str | None) -> None:
    assert presented_key(authorization, x_api_key) == expected


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("15m", 900), ("24h", 86400), ("30d", 2_592_000)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0d", "-1d", "3x", "d", "1.5.2h"])
def test_bad_durations_say_how_to_write_one(text: str) -> None:
    with pytest.raises(ValueError, match="s, m, h, d or w"):
        parse_duration(text)


# ---------------------------------------------------------------------------------------------
# the decision


def test_decision_table() -> None:
    good, good_s = key("good", models=["m1"])
    anymodel, any_s = key("any")
    expired, expired_s = key("old", expires_at=NOW - 1)
    revoked, revoked_s = key("gone", revoked_at=NOW - 100)
    index = KeyIndex([good, anymodel, expired, revoked])
    cases = [
        (None, "m1", Denial.MISSING, None),
        ("gpf_nonsense", "m1", Denial.MALFORMED, None),
        (new_secret(), "m1", Denial.UNKNOWN, None),
        (expired_s, "m1", Denial.EXPIRED, "old"),
        (revoked_s, "m1", Denial.REVOKED, "gone"),
        (good_s, "m2", Denial.MODEL_NOT_ALLOWED, "good"),
        (good_s, "m1", None, "good"),
        (any_s, "whatever", None, "any"),
        (good_s, None, None, "good"),  # routes without a model (GET /v1/models) need only a valid key
    ]
    for presented, model, denial, name in cases:
        v = index.check(presented, model, NOW)
        assert v.denial is denial, (presented, model)
        assert (v.key.name if v.key else None) == name
        assert v.allowed is (denial is None)
        if presented and len(presented) == SECRET_LEN:
            assert presented[8:-4] not in v.message  # the secret never appears in an error


def test_status_codes_follow_openai() -> None:
    assert {d: d.status for d in Denial} == {
        Denial.MISSING: 401,
        Denial.MALFORMED: 401,
        Denial.UNKNOWN: 401,
        Denial.EXPIRED: 401,
        Denial.REVOKED: 401,
        Denial.RETIRED: 401,
        Denial.MODEL_NOT_ALLOWED: 403,
    }


def test_rotation_keeps_the_old_secret_for_the_grace_period_only() -> None:
    rec, old = key("k")
    new = new_secret()
    rec2 = rotated(rec, secret_record(new, NOW), 3600, NOW)
    assert [s.sha256 for s in rec2.secrets] == [digest(new), digest(old)]
    index = KeyIndex([rec2])
    assert index.check(old, "m", NOW + 3599).allowed
    assert index.check(old, "m", NOW + 3600).denial is Denial.RETIRED
    assert index.check(new, "m", NOW + 10 * 3600).allowed
    # A second rotation never extends the first one's grace, and drops what has retired.
    newer = new_secret()
    rec3 = rotated(rec2, secret_record(newer, NOW + 1800), 7200, NOW + 1800)
    assert [s.retires_at for s in rec3.secrets] == [None, NOW + 1800 + 7200, NOW + 3600]
    rec4 = rotated(rec3, secret_record(new_secret(), NOW + 4000), 60, NOW + 4000)
    assert digest(old) not in {s.sha256 for s in rec4.secrets}


# ---------------------------------------------------------------------------------------------
# gpuctl keys


async def _ctl(etcd: EtcdCluster | None, *argv: str) -> tuple[int, str, str]:
    target = ["--etcd", ",".join(etcd.endpoints), "--cluster", CLUSTER] if etcd else []
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gpuctl",
        *target,
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


async def test_keys_in_etcd_store_only_a_digest(etcd: EtcdCluster) -> None:
    rc, out, err = await _ctl(etcd, "keys", "create", "team-a", "--models", "m1,m2", "--rpm", "60", "-o", "json")
    assert rc == 0, err
    created = json.loads(out)
    secret = created["secret"]
    assert well_formed(secret)

    async with etcd.client() as c:
        kv = await c.get(Keyspace(CLUSTER).api_key("team-a"))
    assert kv is not None
    assert secret not in kv.value.decode() and secret[4:20] not in kv.value.decode()
    rec = decode(kv.value, ApiKeyRecord)
    assert rec.models == ["m1", "m2"] and rec.rpm == 60
    assert KeyIndex([rec]).check(secret, "m1", rec.created_at + 1).allowed

    rc, out, err = await _ctl(etcd, "keys", "list")
    assert rc == 0, err
    assert "team-a" in out and "active" in out and secret not in out
    rc, _, err = await _ctl(etcd, "keys", "create", "team-a")
    assert rc == 1 and "exists" in err


async def test_revoke_is_final_and_rotate_keeps_the_old_secret(etcd: EtcdCluster) -> None:
    rc, out, _ = await _ctl(etcd, "keys", "create", "ci", "-o", "json")
    first = json.loads(out)["secret"]
    rc, out, err = await _ctl(etcd, "keys", "rotate", "ci", "--grace", "1h", "-o", "json")
    assert rc == 0, err
    second = json.loads(out)["secret"]
    rec = msgspec.convert(json.loads(out)["key"], ApiKeyRecord)
    index = KeyIndex([rec])
    assert index.check(first, None, rec.created_at + 60).allowed
    assert index.check(second, None, rec.created_at + 60).allowed

    rc, out, _ = await _ctl(etcd, "keys", "revoke", "ci")
    assert rc == 0 and "revoked" in out
    rc, out, _ = await _ctl(etcd, "keys", "show", "ci", "-o", "json")
    rec = msgspec.convert(json.loads(out), ApiKeyRecord)
    assert rec.revoked_at is not None
    assert KeyIndex([rec]).check(second, None, rec.revoked_at + 1).denial is Denial.REVOKED
    rc, _, err = await _ctl(etcd, "keys", "rotate", "ci")
    assert rc == 64 and "revoked" in err
    rc, _, err = await _ctl(etcd, "keys", "show", "nope")
    assert rc == 64 and "no key named nope" in err


async def test_keys_file_for_a_standalone_agent(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    rc, out, err = await _ctl(None, "keys", "create", "local", "--file", str(path), "--expires", "7d", "-o", "json")
    assert rc == 0, err
    secret = json.loads(out)["secret"]
    assert path.stat().st_mode & 0o777 == 0o640  # readable by the agent's group, the directory's
    assert path.stat().st_gid == tmp_path.stat().st_gid
    assert not list(tmp_path.glob("*.lock"))  # the lock is on the directory: no litter
    content = msgspec.json.decode(path.read_bytes(), type=KeysFile)
    assert [k.name for k in content.keys] == ["local"] and secret not in path.read_text()
    rc, out, err = await _ctl(None, "keys", "update", "local", "--file", str(path), "--tpm", "1000", "--models", "m")
    assert rc == 0, err
    content = msgspec.json.decode(path.read_bytes(), type=KeysFile)
    assert content.keys[0].tpm == 1000 and content.keys[0].models == ["m"]
    assert KeyIndex(content.keys).check(secret, "m", content.keys[0].created_at + 1).allowed


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["keys", "create", "a/b"], "invalid key name"),
        (["keys", "create", "k", "--expires", "soon"], "--expires"),
        (["keys", "create", "k", "--rpm", "-5"], "--rpm"),
        (["keys", "create", "k", "--models", "../x"], "--models"),
        (["keys", "update", "k"], "nothing to change"),
    ],
)
async def test_bad_key_commands_are_refused_before_anything_is_written(
    tmp_path: Path, argv: list[str], message: str
) -> None:
    path = tmp_path / "keys.json"
    if argv[1] == "update":
        await _ctl(None, "keys", "create", "k", "--file", str(path))
    before = path.read_bytes() if path.exists() else None
    rc, _, err = await _ctl(None, *argv, "--file", str(path))
    assert rc == 64 and message in err
    assert (path.read_bytes() if path.exists() else None) == before


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's group needs root")
async def test_changing_a_keys_file_keeps_its_owner_and_mode(tmp_path: Path) -> None:
    """root edits /etc/gpu-agent/keys.json; the agent (another user) must still read it after."""
    path = tmp_path / "keys.json"
    assert (await _ctl(None, "keys", "create", "a", "--file", str(path)))[0] == 0
    os.chown(path, 0, 1)  # root:daemon, as root:gpu-agent on a host
    path.chmod(0o640)
    for argv in (["create", "b"], ["revoke", "a"], ["rotate", "b"]):
        rc, _, err = await _ctl(None, "keys", *argv, "--file", str(path))
        assert rc == 0, err
        st = path.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, 1, 0o640), argv
