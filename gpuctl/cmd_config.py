"""``gpuctl config show|set|edit|history``: the cluster's policy at ``/gpufleet/<cluster>/config``.

The coordinators' ``[health]``, ``[weights]``, ``[failover]``, ``[placement]`` and
``[degradation]`` live in etcd (gpufleet/policyconfig.py), so every replica applies the same
policy and a leader change never switches it. Every change is validated by the coordinator's
own Structs before it is written (refused with the field path: exit 65, EX_DATAERR; a
malformed ``SECTION.FIELD=VALUE`` is a usage error, 64), and written with a compare on the key's
mod revision, so two operators' concurrent edits never clobber each other: ``set`` re-applies
its fields to the newer version, ``edit`` refuses and says so.

History: each write also keeps the version it replaces at ``/history/config/<its mod revision>``,
the last ``HISTORY_KEEP`` of them, in the same transaction. Old etcd revisions were the other
choice, but compaction (every few minutes to hours in production) removes them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import msgspec

from gpufleet.etcd import Compare, EtcdClient, KeyValue, Op
from gpufleet.facts import EX_DATAERR
from gpufleet.keyspace import Keyspace
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

from . import common as ctl

EXIT_DATAERR = EX_DATAERR  # a value the policy refuses
HISTORY_KEEP = 20
SET_ATTEMPTS = 5
NO_POLICY = "no cluster policy in etcd yet: the first coordinator to lead writes its file's (start one)"


class Conflict(Exception):
    pass


def _who() -> str:
    return f"{os.environ.get('USER', 'unknown')}@{socket.gethostname()}"


async def _read(etcd: EtcdClient, keys: Keyspace) -> tuple[KeyValue | None, ClusterPolicy | None]:
    kv = await etcd.get(keys.config)
    if kv is None:
        return None, None
    try:
        return kv, decode_policy(kv.value)
    except InvalidPolicy as e:
        print(f"warning: the stored policy is invalid (coordinators skip it): {e}", file=sys.stderr)
        return kv, None


async def _write(etcd: EtcdClient, keys: Keyspace, kv: KeyValue, new: ClusterPolicy) -> int:
    """Replace ``kv`` by ``new`` if nobody changed it since it was read, keeping ``kv`` in the
    history; returns the new mod revision, raises Conflict."""
    new = msgspec.structs.replace(new, updated_by=_who(), updated_at=time.time())
    old = await etcd.get_prefix(keys.config_history, keys_only=True)
    prune = [k.key_str for k in old.kvs][: max(0, len(old.kvs) - (HISTORY_KEEP - 1))]
    res = await etcd.txn(
        [Compare.mod_revision(keys.config, "==", kv.mod_revision)],
        [
            Op.put(keys.config, encode_policy(new)),
            Op.put(keys.config_version(kv.mod_revision), kv.value),
            *(Op.delete(k) for k in prune),
        ],
    )
    if not res.succeeded:
        raise Conflict
    return res.revision


def _problems(e: InvalidPolicy) -> int:
    for p in e.problems:
        print(f"error: {p.path}: {p.message}", file=sys.stderr)
    print("nothing written", file=sys.stderr)
    return EXIT_DATAERR


def _header(keys: Keyspace, kv: KeyValue, p: ClusterPolicy) -> str:
    at = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(p.updated_at)) if p.updated_at else "?"
    return f"# {keys.config}  revision {kv.mod_revision}  by {p.updated_by or '?'}  at {at}\n"


async def _show(etcd: EtcdClient, keys: Keyspace, args: argparse.Namespace) -> int:
    if args.revision:
        kv = await etcd.get(keys.config_version(args.revision))
        if kv is None:
            cur = await etcd.get(keys.config)
            kv = cur if cur is not None and cur.mod_revision == args.revision else None
        if kv is None:
            print(f"error: no version at revision {args.revision} (see gpuctl config history)", file=sys.stderr)
            return ctl.EXIT_ERROR
        try:
            p: ClusterPolicy | None = decode_policy(kv.value)
        except InvalidPolicy as e:
            print(f"error: that version is invalid: {e}", file=sys.stderr)
            return ctl.EXIT_ERROR
    else:
        kv, p = await _read(etcd, keys)
        if kv is None:
            print(f"error: {NO_POLICY}", file=sys.stderr)
            return ctl.EXIT_ERROR
        if p is None:
            print(kv.value.decode("utf-8", "replace"))
            return ctl.EXIT_ERROR
    assert p is not None
    if args.output == "json":
        print(json.dumps({"revision": kv.mod_revision, "policy": msgspec.to_builtins(p)}, indent=2))
    else:
        print(_header(keys, kv, p) + to_toml(p), end="")
    return ctl.EXIT_OK


async def _set(etcd: EtcdClient, keys: Keyspace, args: argparse.Namespace) -> int:
    for _ in range(SET_ATTEMPTS):
        kv, current = await _read(etcd, keys)
        if kv is None:
            print(f"error: {NO_POLICY}", file=sys.stderr)
            return ctl.EXIT_ERROR
        if current is None:
            print(
                "error: fix the stored policy with gpuctl config edit (set changes fields of a valid one)",
                file=sys.stderr,
            )
            return ctl.EXIT_ERROR
        try:
            new = with_assignments(current, args.assignments)
        except InvalidPolicy as e:
            return _problems(e)
        changes = diff(current, new)
        if not changes:
            print("no change: the cluster policy already says so")
            return ctl.EXIT_OK
        try:
            rev = await _write(etcd, keys, kv, new)
        except Conflict:
            continue  # changed meanwhile: apply our fields to the newer version
        print("\n".join(changes))
        print(f"cluster policy updated (revision {rev}); the leading coordinator applies it")
        return ctl.EXIT_OK
    print("error: the policy kept changing under us; nothing written", file=sys.stderr)
    return ctl.EXIT_ERROR


async def _history(etcd: EtcdClient, keys: Keyspace, args: argparse.Namespace) -> int:
    kv = await etcd.get(keys.config)
    old = await etcd.get_prefix(keys.config_history)
    versions: list[tuple[int, ClusterPolicy | None]] = []
    for h in old.kvs:
        try:
            versions.append((int(Keyspace.name_in(keys.config_history, h.key_str)), decode_policy(h.value)))
        except (ValueError, InvalidPolicy):
            versions.append((int(Keyspace.name_in(keys.config_history, h.key_str) or 0), None))
    if kv is not None:
        try:
            versions.append((kv.mod_revision, decode_policy(kv.value)))
        except InvalidPolicy:
            versions.append((kv.mod_revision, None))
    versions.sort(key=lambda v: v[0])
    rows = []
    prev: ClusterPolicy | None = None
    for rev, p in versions:
        changes = (diff(prev, p) if prev is not None else ["(first kept version)"]) if p is not None else ["invalid"]
        rows.append(
            {
                "revision": rev,
                "current": kv is not None and rev == kv.mod_revision,
                "by": p.updated_by if p else None,
                "at": p.updated_at if p else None,
                "changes": changes,
            }
        )
        prev = p if p is not None else prev
    rows.reverse()
    table = ctl.render_table(
        [
            [
                str(r["revision"]) + (" *" if r["current"] else ""),
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["at"])) if r["at"] else "-",
                r["by"] or "-",
                "; ".join(r["changes"])[:100],
            ]
            for r in rows
        ],
        ["REVISION", "AT", "BY", "CHANGES"],
    )
    ctl.emit(args, rows, table if rows else NO_POLICY)
    return ctl.EXIT_OK


def _edit_loop(text: str, editor: str) -> ClusterPolicy | int | None:
    """Open ``editor`` on ``text`` until it validates; the policy, None (unchanged) or an exit code."""
    with tempfile.NamedTemporaryFile("w", suffix=".toml", prefix="gpufleet-policy-", delete=False) as f:
        f.write(text)
        path = Path(f.name)
    try:
        while True:
            if subprocess.call([*shlex.split(editor), str(path)]) != 0:
                print("error: the editor failed; nothing written", file=sys.stderr)
                return ctl.EXIT_ERROR
            edited = path.read_text()
            if edited == text:
                return None
            try:
                return policy_from_builtins(tomllib.loads(edited))
            except tomllib.TOMLDecodeError as e:
                print(f"error: invalid TOML: {e}", file=sys.stderr)
            except InvalidPolicy as e:
                for p in e.problems:
                    print(f"error: {p.path}: {p.message}", file=sys.stderr)
            if not sys.stdin.isatty() or input("edit again? [Y/n] ").strip().lower() in ("n", "no"):
                print("nothing written", file=sys.stderr)
                return EXIT_DATAERR
    finally:
        path.unlink(missing_ok=True)


async def _edit_write(etcd: EtcdClient, keys: Keyspace, args: argparse.Namespace) -> int:
    kv, new = args.read_kv, args.new_policy
    try:
        rev = await _write(etcd, keys, kv, new)
    except Conflict:
        print("error: someone changed the cluster policy meanwhile; nothing written (edit again)", file=sys.stderr)
        return ctl.EXIT_ERROR
    print("\n".join(diff(args.read_policy, new)) or "(no setting changed)")
    print(f"cluster policy updated (revision {rev}); the leading coordinator applies it")
    return ctl.EXIT_OK


async def _edit_read(etcd: EtcdClient, keys: Keyspace, args: argparse.Namespace) -> int:
    args.read_kv, args.read_policy = await _read(etcd, keys)
    if args.read_kv is None:
        print(f"error: {NO_POLICY}", file=sys.stderr)
        return ctl.EXIT_ERROR
    return ctl.EXIT_OK


def cmd_edit(args: argparse.Namespace) -> int:
    code = ctl.run_etcd(_edit_read, args)
    if code != ctl.EXIT_OK:
        return code
    current = args.read_policy or ClusterPolicy()
    text = _header(Keyspace(args.cluster), args.read_kv, current) + to_toml(current)
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    out = _edit_loop(text, editor)
    if out is None:
        print("no change")
        return ctl.EXIT_OK
    if isinstance(out, int):
        return out
    args.new_policy = out
    if args.read_policy is None:
        args.read_policy = ClusterPolicy()
    return ctl.run_etcd(_edit_write, args)


def cmd_set(args: argparse.Namespace) -> int:
    try:
        args.assignments = [parse_assignment(a) for a in args.settings]
    except ValueError as e:
        raise ctl.UsageError(str(e)) from None
    return ctl.run_etcd(_set, args)


def add_config_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    config = sub.add_parser(
        "config", help="the cluster's policy: [health] [weights] [failover] [placement] [degradation]"
    )
    csub = config.add_subparsers(dest="config_cmd", required=True)
    show = csub.add_parser("show", help="the cluster policy as TOML (or JSON with -o json)")
    show.add_argument("--revision", type=int, help="an earlier version (see history)")
    show.set_defaults(func=lambda a: ctl.run_etcd(_show, a))
    st = csub.add_parser("set", help="change fields: SECTION.FIELD=VALUE ... (validated; all or nothing)")
    st.add_argument("settings", nargs="+", metavar="SECTION.FIELD=VALUE", help="e.g. health.eject_base_s=10")
    st.set_defaults(func=cmd_set)
    csub.add_parser("edit", help="edit the cluster policy in $EDITOR (validated before it is written)").set_defaults(
        func=cmd_edit
    )
    csub.add_parser("history", help=f"the last {HISTORY_KEEP} versions, what each changed").set_defaults(
        func=lambda a: ctl.run_etcd(_history, a)
    )
