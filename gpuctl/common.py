"""What every gpuctl command shares: exit codes, errors, the etcd connection from the global
options, decoding, and output (a table, or JSON with ``-o json``).

The subcommand modules (``cmd_*``) and ``main`` import this; nothing here imports them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from gpufleet.etcd import EtcdClient, EtcdError, EtcdNoLeader, EtcdTimeout, EtcdUnavailable, KeyValue
from gpufleet.etcdconfig import EtcdSettings
from gpufleet.facts import EX_USAGE
from gpufleet.keyspace import InvalidName, Keyspace, decode_or_skip
from gpufleet.tomlconfig import problem_from_validation

T = TypeVar("T")

EXIT_OK, EXIT_ERROR, EXIT_UNREACHABLE, EXIT_USAGE = 0, 1, 2, EX_USAGE


class Unreachable(Exception):
    pass


class UsageError(Exception):
    pass


def request(
    url: str,
    method: str = "GET",
    token: str | None = None,
    timeout: float = 5.0,
    context: ssl.SSLContext | None = None,
) -> tuple[int, Any]:
    """``context``: how an https:// agent or coordinator is verified (:func:`api_tls`)."""
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            return e.code, json.loads(body)
        except ValueError:
            return e.code, {"error": {"message": body.decode(errors="replace")}}
    except (urllib.error.URLError, OSError) as e:
        raise Unreachable(f"cannot reach {url}: {getattr(e, 'reason', e)}") from None


def api_tls(args: argparse.Namespace) -> ssl.SSLContext:
    """The context https:// agents and coordinators are reached with: their certificate
    verified against ``--cacert`` (the cluster's CA; the system's store without it), and
    ``--cert``/``--key`` presented where they ask for a client certificate (mutual TLS). The
    same flags as etcd's: the playbook's one CA signs etcd's, the agents' and the coordinators'
    certificates."""
    try:
        ctx = ssl.create_default_context(cafile=args.cacert)
        if args.cert:
            ctx.load_cert_chain(args.cert, args.key)
    except (OSError, ssl.SSLError) as e:
        raise UsageError(f"--cacert/--cert/--key: {e.strerror or e}") from None
    return ctx


def read_token(path: str | None, env: str) -> str | None:
    """A bearer token from ``path`` (a --token-file) or the environment variable ``env``."""
    if not path:
        return os.environ.get(env) or None
    try:
        return Path(path).read_text().strip()
    except OSError as e:
        raise UsageError(f"--token-file: cannot read {path}: {e.strerror or e}") from None


def render_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


_OPTION_OF = {
    "endpoints": "--etcd",
    "cluster": "--cluster",
    "ca_file": "--cacert",
    "cert_file": "--cert",
    "key_file": "--key",
    "username": "--user",
    "password_file": "--password-file",
    "timeout_s": "--timeout",
}


def etcd_settings(args: argparse.Namespace) -> EtcdSettings:
    endpoints = [e.strip() for e in (args.etcd or "").split(",") if e.strip()]
    if not endpoints:
        raise UsageError("give --etcd URLS (or set GPUFLEET_ETCD)")
    given = {
        "endpoints": endpoints,
        "cluster": args.cluster,
        "ca_file": args.cacert,
        "cert_file": args.cert,
        "key_file": args.key,
        "username": args.user,
        "password_file": args.password_file,
        "timeout_s": args.timeout,
    }
    try:
        settings = msgspec.convert(given, EtcdSettings)
        Keyspace(settings.cluster)
    except msgspec.ValidationError as e:
        # Said in the command line's words: "--etcd: 127.0.0.1:2379 is not a URL; write http://…"
        problem = problem_from_validation(e, "$", EtcdSettings, given)
        field = problem.path.removeprefix("$.").split("[")[0].split(".")[0]
        raise UsageError(f"{_OPTION_OF.get(field, field)}: {problem.message}") from None
    except InvalidName as e:
        raise UsageError(str(e)) from None
    if problems := settings.problems("$"):
        raise UsageError("; ".join(p.message for p in problems))
    return settings


def decode_all(kvs: list[KeyValue], typ: type[T]) -> list[T]:
    out = []
    for kv in kvs:
        rec = decode_or_skip(kv.key_str, kv.value, typ, kv.mod_revision)
        if rec is None:
            print(f"warning: skipped invalid record at {kv.key_str}", file=sys.stderr)
        else:
            out.append(rec)
    return out


def run_etcd(fn: Callable[[EtcdClient, Keyspace, argparse.Namespace], Awaitable[int]], args: argparse.Namespace) -> int:
    """Run one etcd-backed command with etcdctl-style exit codes."""
    settings = etcd_settings(args)

    async def go() -> int:
        async with settings.client() as etcd:
            return await fn(etcd, Keyspace(settings.cluster), args)

    try:
        return asyncio.run(go())
    except (EtcdUnavailable, EtcdTimeout, EtcdNoLeader) as e:
        print(f"error: etcd unreachable: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except (EtcdError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR


def emit(args: argparse.Namespace, obj: object, table: str) -> None:
    print(msgspec.json.format(msgspec.json.encode(obj), indent=2).decode() if args.output == "json" else table)
