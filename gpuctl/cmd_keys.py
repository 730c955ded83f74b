"""``gpuctl keys create|list|show|revoke|rotate|update``: API keys under ``/gpufleet/<cluster>/keys/``,
or in a standalone agent's keys file (``--file PATH``, the same records as JSON).

A secret is printed once, by ``create`` and ``rotate``, and stored nowhere (etcd holds its
SHA-256). Every change is a compare-and-swap on the record's revision, so two operators acting
on one key at once cannot undo each other's revocation; a revoked key is never deleted, so no
node can see it come back.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import msgspec

from gpufleet.apikeys import KeysFile, key_state, new_secret, parse_duration, rotated, secret_record
from gpufleet.etcd import Compare, EtcdClient, Op
from gpufleet.fileio import atomic_write_bytes
from gpufleet.keyspace import InvalidName, Keyspace, check_model, check_name, decode_or_skip, encode
from gpufleet.keyspace.records import ApiKeyRecord

from . import common as ctl

DEFAULT_GRACE = "24h"


class Conflict(Exception):
    """The record changed between our read and our write."""


class KeyStore(Protocol):
    """Where keys live: etcd (a cluster) or a JSON file (a standalone agent). ``version`` is what
    ``replace`` compares against (etcd's mod revision; the file's whole content)."""

    async def list(self) -> list[ApiKeyRecord]: ...
    async def get(self, name: str) -> tuple[ApiKeyRecord, object] | None: ...
    async def create(self, rec: ApiKeyRecord) -> bool: ...  # False: the name exists
    async def replace(self, rec: ApiKeyRecord, version: object) -> None: ...  # raises Conflict


class EtcdKeyStore:
    def __init__(self, etcd: EtcdClient, keys: Keyspace) -> None:
        self.etcd, self.keys = etcd, keys

    async def list(self) -> list[ApiKeyRecord]:
        res = await self.etcd.get_prefix(self.keys.api_keys)
        return ctl.decode_all(res.kvs, ApiKeyRecord)

    async def get(self, name: str) -> tuple[ApiKeyRecord, object] | None:
        kv = await self.etcd.get(self.keys.api_key(name))
        if kv is None:
            return None
        rec = decode_or_skip(kv.key_str, kv.value, ApiKeyRecord, kv.mod_revision)
        if rec is None:
            raise ctl.UsageError(f"the record at {kv.key_str} is not a valid key record; fix or remove it with etcdctl")
        return rec, kv.mod_revision

    async def create(self, rec: ApiKeyRecord) -> bool:
        key = self.keys.api_key(rec.name)
        res = await self.etcd.txn([Compare.absent(key)], [Op.put(key, encode(rec))])
        return res.succeeded

    async def replace(self, rec: ApiKeyRecord, version: object) -> None:
        key = self.keys.api_key(rec.name)
        assert isinstance(version, int)
        res = await self.etcd.txn([Compare.mod_revision(key, "=", version)], [Op.put(key, encode(rec))])
        if not res.succeeded:
            raise Conflict


class FileKeyStore:
    """A keys file, changed under an exclusive lock and replaced atomically (the agent re-reads
    it on SIGHUP and never sees half a file)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Changes to the file, one at a time. The lock is on the directory: the file itself is
        replaced by each change, and a lock file would be litter in /etc."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read(self) -> KeysFile:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return KeysFile()
        try:
            return msgspec.json.decode(data, type=KeysFile)
        except msgspec.DecodeError as e:
            raise ctl.UsageError(f"{self.path}: not a keys file: {e}") from None

    def _write(self, content: KeysFile) -> None:
        """Replace the file keeping its mode and owner, so the agent (which reads it as its own
        user) can still read it after root changed it. A new file is 0640 in the directory's
        group (the packaging and the playbook make /etc/gpu-agent root:gpu-agent): it holds no
        secrets, but who may use which model is nobody else's business."""
        try:
            st = self.path.stat()
            mode, owner = st.st_mode & 0o777, (st.st_uid, st.st_gid)
        except FileNotFoundError:
            mode, owner = 0o640, (os.geteuid(), self.path.parent.stat().st_gid)
        data = msgspec.json.format(msgspec.json.encode(content), indent=2) + b"\n"
        atomic_write_bytes(self.path, data, mode, owner if os.geteuid() == 0 else None)

    async def list(self) -> list[ApiKeyRecord]:
        return self._read().keys

    async def get(self, name: str) -> tuple[ApiKeyRecord, object] | None:
        for rec in self._read().keys:
            if rec.name == name:
                return rec, rec
        return None

    async def create(self, rec: ApiKeyRecord) -> bool:
        with self._locked():
            content = self._read()
            if any(k.name == rec.name for k in content.keys):
                return False
            content.keys.append(rec)
            self._write(content)
        return True

    async def replace(self, rec: ApiKeyRecord, version: object) -> None:
        with self._locked():
            content = self._read()
            for i, k in enumerate(content.keys):
                if k.name == rec.name:
                    if k != version:
                        raise Conflict
                    content.keys[i] = rec
                    self._write(content)
                    return
            raise Conflict


# ---------------------------------------------------------------------------------------------
# output


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts))


def key_rows(recs: list[ApiKeyRecord], now: float) -> list[list[str]]:
    def limit(v: int | None) -> str:
        return "-" if v is None else str(v)

    rows = []
    for r in sorted(recs, key=lambda r: r.name):
        rows.append(
            [
                r.name,
                r.owner or "-",
                key_state(r, now),
                ",".join(r.models) or "*",
                limit(r.rpm),
                limit(r.tpm),
                limit(r.max_concurrency),
                _when(r.expires_at),
                " ".join(f"…{s.hint}" for s in r.secrets),
            ]
        )
    return rows


def format_keys(recs: list[ApiKeyRecord], now: float) -> str:
    header = ["NAME", "OWNER", "STATE", "MODELS", "RPM", "TPM", "CONCURRENCY", "EXPIRES (UTC)", "SECRETS"]
    return ctl.render_table(key_rows(recs, now), header)


def format_key(rec: ApiKeyRecord, now: float) -> str:
    lines = [
        f"name:          {rec.name}",
        f"owner:         {rec.owner or '-'}",
        f"state:         {key_state(rec, now)}" + (f" since {_when(rec.revoked_at)}" if rec.revoked_at else ""),
        f"models:        {', '.join(rec.models) or 'every model'}",
        f"rpm:           {rec.rpm if rec.rpm is not None else 'unlimited'}",
        f"tpm:           {rec.tpm if rec.tpm is not None else 'unlimited'}",
        f"concurrency:   {rec.max_concurrency if rec.max_concurrency is not None else 'unlimited'}",
        f"created (UTC): {_when(rec.created_at)}",
        f"expires (UTC): {_when(rec.expires_at) if rec.expires_at else 'never'}",
        "secrets:",
    ]
    for s in rec.secrets:
        valid = "current" if s.retires_at is None else f"valid until {_when(s.retires_at)} (rotated)"
        lines.append(f"  …{s.hint}  created {_when(s.created_at)}  {valid}")
    return "\n".join(lines)


def _print_secret(args: argparse.Namespace, rec: ApiKeyRecord, secret: str, verb: str) -> None:
    if args.output == "json":
        ctl.emit(args, {"name": rec.name, "secret": secret, "key": rec}, "")
        return
    print(f"key {rec.name} {verb}. Its secret is shown this once and stored nowhere; keep it now:\n")
    print(f"    {secret}\n")
    print("Clients send it as 'Authorization: Bearer <secret>' (the OpenAI SDKs' api_key) or 'x-api-key'.")


# ---------------------------------------------------------------------------------------------
# commands


def _limits(args: argparse.Namespace) -> dict[str, object]:
    """The fields ``create`` and ``update`` share, from the options given (None: not given)."""
    out: dict[str, object] = {}
    if args.models is not None:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        try:
            out["models"] = [check_model(m) for m in models]
        except InvalidName as e:
            raise ctl.UsageError(f"--models: {e}") from None
    for field in ("rpm", "tpm", "max_concurrency"):
        value = getattr(args, field)
        if value is not None:
            if value < 0:
                raise ctl.UsageError(f"--{field.replace('_', '-')}: must be 0 (no limit) or more, not {value}")
            out[field] = value or None  # 0 lifts the limit
    if args.owner is not None:
        out["owner"] = args.owner
    if args.expires is not None:
        try:
            out["expires_at"] = None if args.expires == "never" else time.time() + parse_duration(args.expires)
        except ValueError as e:
            raise ctl.UsageError(f"--expires: {e}") from None
    return out


async def _create(store: KeyStore, args: argparse.Namespace) -> int:
    now = time.time()
    secret = new_secret()
    rec = ApiKeyRecord(name=args.name, created_at=now, secrets=[secret_record(secret, now)])
    rec = msgspec.structs.replace(rec, **args.fields)
    if not await store.create(rec):
        print(f"error: a key named {args.name} exists (rotate it, or pick another name)", file=sys.stderr)
        return ctl.EXIT_ERROR
    _print_secret(args, rec, secret, "created")
    return ctl.EXIT_OK


async def _list(store: KeyStore, args: argparse.Namespace) -> int:
    recs = await store.list()
    ctl.emit(args, recs, format_keys(recs, time.time()))
    return ctl.EXIT_OK


async def _existing(store: KeyStore, name: str) -> tuple[ApiKeyRecord, object]:
    found = await store.get(name)
    if found is None:
        raise ctl.UsageError(f"no key named {name}")
    return found


async def _show(store: KeyStore, args: argparse.Namespace) -> int:
    rec, _ = await _existing(store, args.name)
    ctl.emit(args, rec, format_key(rec, time.time()))
    return ctl.EXIT_OK


async def _revoke(store: KeyStore, args: argparse.Namespace) -> int:
    rec, version = await _existing(store, args.name)
    if rec.revoked_at is not None:
        print(f"key {rec.name} was already revoked at {_when(rec.revoked_at)} UTC")
        return ctl.EXIT_OK
    await store.replace(msgspec.structs.replace(rec, revoked_at=time.time()), version)
    print(f"key {rec.name} revoked: every agent refuses it within seconds, and it cannot be un-revoked")
    return ctl.EXIT_OK


async def _rotate(store: KeyStore, args: argparse.Namespace) -> int:
    rec, version = await _existing(store, args.name)
    if rec.revoked_at is not None:
        raise ctl.UsageError(f"key {rec.name} is revoked; create a new key instead")
    try:
        grace_s = parse_duration(args.grace) if args.grace != "0" else 0.0
    except ValueError as e:
        raise ctl.UsageError(f"--grace: {e}") from None
    now = time.time()
    secret = new_secret()
    new = rotated(rec, secret_record(secret, now), grace_s, now)
    await store.replace(new, version)
    _print_secret(args, new, secret, f"rotated (the old secret stays valid for {args.grace})")
    return ctl.EXIT_OK


async def _update(store: KeyStore, args: argparse.Namespace) -> int:
    rec, version = await _existing(store, args.name)
    if not args.fields:
        raise ctl.UsageError("nothing to change: give --models, --rpm, --tpm, --max-concurrency, --owner or --expires")
    new = msgspec.structs.replace(rec, **args.fields)
    await store.replace(new, version)
    ctl.emit(args, new, f"key {rec.name} updated\n" + format_key(new, time.time()))
    return ctl.EXIT_OK


def _dispatch(action):  # type: ignore[no-untyped-def]
    """Run ``action`` on the store the options name: ``--file`` or the cluster's etcd."""

    def run(args: argparse.Namespace) -> int:
        if getattr(args, "name", None) is not None:
            try:
                check_name("key", args.name)
            except InvalidName as e:
                raise ctl.UsageError(str(e)) from None
        if hasattr(args, "models"):
            args.fields = _limits(args)
        try:
            if args.file:
                return asyncio.run(action(FileKeyStore(Path(args.file)), args))

            async def on_etcd(etcd: EtcdClient, keys: Keyspace, a: argparse.Namespace) -> int:
                return await action(EtcdKeyStore(etcd, keys), a)

            return ctl.run_etcd(on_etcd, args)
        except Conflict:
            print(f"error: key {args.name} changed meanwhile; nothing written (run the command again)", file=sys.stderr)
            return ctl.EXIT_ERROR

    return run


def _limit_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", help="models the key may use, comma-separated (default: every model)")
    p.add_argument("--rpm", type=int, help="requests per minute, across the fleet (0: no limit)")
    p.add_argument("--tpm", type=int, help="prompt+completion tokens per minute, across the fleet (0: no limit)")
    p.add_argument("--max-concurrency", type=int, help="requests in flight at once, across the fleet (0: no limit)")
    p.add_argument("--owner", help="the team or person the key belongs to")
    p.add_argument("--expires", help="lifetime from now, e.g. 30d, 12h, 2w ('never' on update lifts it)")


def add_key_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = sub.add_parser("keys", help="API keys: who may use which models, and how much")
    ksub = keys.add_subparsers(dest="keys_cmd", required=True)

    def command(name: str, help: str, action, needs_name: bool = True) -> argparse.ArgumentParser:  # type: ignore[no-untyped-def]
        p = ksub.add_parser(name, help=help)
        if needs_name:
            p.add_argument("name")
        p.add_argument("--file", help="a standalone agent's keys file instead of etcd")
        p.set_defaults(func=_dispatch(action))
        return p

    _limit_options(command("create", "create a key; prints its secret once", _create))
    command("list", "every key (no secrets)", _list, needs_name=False)
    command("show", "one key (no secret)", _show)
    command("revoke", "refuse a key on every node from now on", _revoke)
    rotate = command("rotate", "give a key a new secret; the old one stays valid for --grace", _rotate)
    rotate.add_argument(
        "--grace",
        default=DEFAULT_GRACE,
        help=f"how long the old secret stays valid (default {DEFAULT_GRACE}; 0: not at all)",
    )
    _limit_options(command("update", "change a key's models, limits, owner or expiry", _update))
