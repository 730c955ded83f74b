"""``gpuctl``: the operator's command line.

Cluster commands (``nodes``, ``routes``, ``models``, ``drain``) read etcd (``--etcd URLS
--cluster NAME`` plus TLS and auth flags, or $GPUFLEET_ETCD / $GPUFLEET_CLUSTER); agent
commands (``status``, ``instance``) talk to one agent (``--agent URL``). Output is a table by
default and JSON with ``-o json``. Exit codes follow etcdctl's spirit: 0 ok, 1 error, 2 etcd or
the agent unreachable, 64 usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, TypeVar

from gpufleet import data
from gpufleet.cliargs import Options, Parser, add_version, shared_options
from gpufleet.etcd import EtcdClient
from gpufleet.keyspace import InvalidName, Keyspace, check_name, decode_or_skip, encode
from gpufleet.keyspace.records import DrainRecord, LeaderRecord, NodeRecord, RouteEndpoint, RouteRecord, epoch_of
from gpufleet.routeslices import read_route_records, read_routes

from .common import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    Unreachable,
    UsageError,
    api_tls,
    decode_all,
    emit,
    read_token,
    render_table,
    request,
    run_etcd,
)

T = TypeVar("T")

# Shipped as package data (gpufleet/data), so the demo runs from an installed wheel too.
DEMO_CONFIG = data.example("standalone-demo.toml")


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.1f}"


def format_status(st: dict[str, Any]) -> str:
    out = [f"node {st['node']}  {st['address']}  mode={st['mode']}  ready={'yes' if st['ready'] else 'no'}", ""]
    gpu_rows = [
        [
            str(g["index"]),
            g["gpu_class"],
            g["name"],
            f"{_gib(g['memory_used_bytes'])}/{_gib(g['memory_total_bytes'])}",
            "-" if g["utilization_percent"] is None else f"{g['utilization_percent']:.0f}%",
            "-" if g["temperature_celsius"] is None else f"{g['temperature_celsius']:.0f}°C",
            "LOST" if g["lost"] else (", ".join(g["errors"]) or "ok"),
        ]
        for g in st["gpus"]
    ]
    out.append(render_table(gpu_rows, ["GPU", "CLASS", "NAME", "MEM GiB", "UTIL", "TEMP", "STATUS"]))
    out.append("")
    inst_rows = [
        [
            i["name"],
            i["model"],
            i["backend"],
            i["state"],
            str(i["port"]),
            ",".join(map(str, i["gpus"])) or "cpu",
            str(i["pid"] or "-"),
            str(i["restarts"]),
            (i["last_error"] or "")[:60],
        ]
        for i in st["instances"]
    ]
    out.append(
        render_table(
            inst_rows, ["INSTANCE", "MODEL", "BACKEND", "STATE", "PORT", "GPUS", "PID", "RESTARTS", "LAST ERROR"]
        )
    )
    return "\n".join(out)


def cmd_status(args: argparse.Namespace) -> int:
    if args.etcd:
        return run_etcd(cmd_cluster_status, args)
    token = read_token(args.token_file, "GPUFLEET_STATUS_TOKEN")
    code, st = request(args.agent.rstrip("/") + "/v1/status", token=token, context=api_tls(args))
    if code != 200:
        print(f"error: agent answered HTTP {code}: {st}", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps(st, indent=2) if args.output == "json" else format_status(st))
    return EXIT_OK


def cmd_instance(args: argparse.Namespace) -> int:
    token = Path(args.token_file).read_text().strip() if args.token_file else os.environ.get("GPUFLEET_ADMIN_TOKEN")
    if not token:
        print("error: give --token-file or set GPUFLEET_ADMIN_TOKEN", file=sys.stderr)
        return EXIT_USAGE
    url = f"{args.agent.rstrip('/')}/admin/instances/{args.name}/{args.action}"
    code, body = request(url, "POST", token, context=api_tls(args))
    if code != 202:
        print(f"error: HTTP {code}: {body.get('error', {}).get('message', body)}", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps(body, indent=2) if args.output == "json" else f"{args.action} {args.name}: accepted")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    if args.standalone:
        return cmd_demo_standalone(args)
    from gpufleet_dev.demo import CLUSTER, run_cluster_demo

    def show_status(etcd: str) -> None:
        ns = argparse.Namespace(**{**vars(args), "etcd": etcd, "cluster": CLUSTER, "output": "table"})
        run_etcd(cmd_cluster_status, ns)
        print(
            "(WEIGHT SUM: a node's endpoint weights added up over every model it serves; the route table\n"
            " gives each endpoint's own weight, its share of that model's traffic)",
            flush=True,
        )

    return run_cluster_demo(args.base_port, args.duration, args.chaos, show_status)


def cmd_demo_standalone(args: argparse.Namespace) -> int:
    from gpufleet_dev.demo_standalone import run_standalone_demo

    config = Path(args.config)
    if not config.exists():
        print(f"error: demo config {config} not found", file=sys.stderr)
        return EXIT_USAGE
    return run_standalone_demo(config, args.duration, lambda url: print(format_status(request(url + "/v1/status")[1])))


def _age(ts: float) -> str:
    s = max(0, int(time.time() - ts))
    return f"{s}s" if s < 120 else f"{s // 60}m"


def format_nodes(nodes: list[NodeRecord]) -> str:
    rows = []
    for n in nodes:
        ready = sum(i.state == "READY" for i in n.instances)
        hottest = max((g.temperature_celsius or 0 for g in n.gpus), default=0)
        rows.append(
            [
                n.node,
                n.address,
                "yes" if n.ready else "no",
                ",".join(n.gpu_classes) or "-",
                str(len(n.gpus)),
                f"{ready}/{len(n.instances)}",
                f"{hottest:.0f}°C" if n.gpus else "-",
                _age(n.updated_at),
            ]
        )
    return render_table(rows, ["NODE", "ADDRESS", "READY", "CLASSES", "GPUS", "INSTANCES", "HOTTEST", "UPDATED"])


async def cmd_nodes_etcd(etcd: EtcdClient, keys: Keyspace, args: argparse.Namespace) -> int:
    nodes = sorted(decode_all((await etcd.get_prefix(keys.nodes)).kvs, NodeRecord), key=lambda n: n.node)
    emit(args, nodes, format_nodes(nodes) if nodes else f"no nodes registered in cluster {keys.cluster!r}")
    return EXIT_OK


def cmd_nodes(args: argparse.Namespace) -> int:
    return run_etcd(cmd_nodes_etcd, args)


def format_routes(routes: list[RouteRecord], slices: dict[str, dict[tuple[str, str], int]] | None = None) -> str:
    """One row per endpoint; SLICE is the slice that lists it (``-`` in a schema-1 route)."""
    rows = []
    for r in routes:
        where = (slices or {}).get(r.model, {})
        for e in r.endpoints:
            n = where.get((e.node, e.instance))
            rows.append(
                [r.model, e.node, e.instance, e.gpu_class, str(e.weight), e.state, e.address, str(r.epoch)]
                + ([f"@{n:04d}" if n is not None else "-"] if slices is not None else [])
            )
    head = ["MODEL", "NODE", "INSTANCE", "CLASS", "WEIGHT", "STATE", "ADDRESS", "EPOCH"]
    return render_table(rows, head + (["SLICE"] if slices is not None else []))


async def cmd_routes_etcd(etcd: EtcdClient, keys: Keyspace, args: argparse.Namespace) -> int:
    table = await read_route_records(etcd, keys)
    routes = sorted((table.assemble(m) or h for m, h in table.headers.items()), key=lambda r: r.model)
    slices = {r.model: table.slice_numbers(r.model) for r in routes}
    emit(args, routes, format_routes(routes, slices) if routes else "no routes (is a coordinator leading?)")
    return EXIT_OK


def cmd_routes(args: argparse.Namespace) -> int:
    return run_etcd(cmd_routes_etcd, args)


async def cmd_cluster_status(etcd: EtcdClient, keys: Keyspace, args: argparse.Namespace) -> int:
    leader_kv = await etcd.get(keys.leader)
    leader = decode_or_skip(keys.leader, leader_kv.value, LeaderRecord) if leader_kv else None
    nodes = sorted(decode_all((await etcd.get_prefix(keys.nodes)).kvs, NodeRecord), key=lambda n: n.node)
    routes = sorted((await read_routes(etcd, keys)).values(), key=lambda r: r.model)
    drained = {Keyspace.name_in(keys.drains, kv.key_str) for kv in (await etcd.get_prefix(keys.drains)).kvs}
    per_node: dict[str, list[RouteEndpoint]] = {}
    for r in routes:
        for e in r.endpoints:
            per_node.setdefault(e.node, []).append(e)
    node_rows = []
    for n in nodes:
        eps = per_node.get(n.node, [])
        states = sorted({e.state for e in eps})
        temps = [g.temperature_celsius for g in n.gpus if g.temperature_celsius is not None]
        utils = [g.utilization_percent for g in n.gpus if g.utilization_percent is not None]
        node_rows.append(
            {
                "node": n.node,
                "classes": n.gpu_classes,
                "temperature_celsius": max(temps) if temps else None,
                "utilization_percent": round(sum(utils) / len(utils), 1) if utils else None,
                "state": "DRAINED" if n.node in drained else ("/".join(states) if states else "-"),
                "weight": sum(e.weight for e in eps),
                "ready": n.ready,
            }
        )
    doc = {
        "cluster": keys.cluster,
        "leader": None
        if leader is None
        else {
            "coordinator": leader.coordinator,
            "address": leader.address,
            "epoch": epoch_of(leader, leader_kv.create_revision) if leader_kv else None,
        },
        "nodes": node_rows,
        "routes": routes,
    }
    lead = (
        "none (no coordinator is leading)"
        if leader is None
        else (f"{leader.coordinator} epoch {doc['leader']['epoch'] or '?'} ({leader.address})")
    )
    table = render_table(
        [
            [
                r["node"],
                ",".join(r["classes"]) or "-",
                "-" if r["temperature_celsius"] is None else f"{r['temperature_celsius']:.0f}°C",
                "-" if r["utilization_percent"] is None else f"{r['utilization_percent']:.0f}%",
                r["state"],
                str(r["weight"]),
            ]
            for r in node_rows
        ],
        ["NODE", "CLASSES", "TEMP", "UTIL", "STATE", "WEIGHT SUM"],
    )
    text = f"cluster {keys.cluster}  leader: {lead}\n\n{table}\n\n" + (format_routes(routes) if routes else "no routes")
    emit(args, doc, text)
    return EXIT_OK if leader is not None else EXIT_ERROR


async def cmd_drain_etcd(etcd: EtcdClient, keys: Keyspace, args: argparse.Namespace) -> int:
    if args.cmd == "drain":
        who = f"{os.environ.get('USER', 'unknown')}@{socket.gethostname()}"
        rec = DrainRecord(node=args.node, reason=args.reason or "", by=who, at=time.time())
        await etcd.put(keys.drain(args.node), encode(rec))
        print(f"node {args.node} drained: it gets no new requests; requests in flight finish")
    else:
        res = await etcd.delete(keys.drain(args.node))
        print(f"node {args.node} undrained" if res.deleted else f"node {args.node} was not drained")
    return EXIT_OK


def cmd_drain(args: argparse.Namespace) -> int:
    try:
        check_name("node", args.node)
    except InvalidName as e:
        raise UsageError(str(e)) from None
    return run_etcd(cmd_drain_etcd, args)


async def cmd_check_etcd(etcd: EtcdClient, keys: Keyspace, args: argparse.Namespace) -> int:
    from gpuctl.check import gather, judge

    token = read_token(args.token_file, "GPUFLEET_STATUS_TOKEN")
    results = judge(await gather(etcd, keys, list(etcd.endpoints), ssl=api_tls(args), token=token))
    table = "\n".join(f"{r.status:<4}  {r.name}: {r.detail}" for r in results)
    failed = sum(r.status == "FAIL" for r in results)
    emit(args, results, table + f"\n\n{len(results) - failed} of {len(results)} checks passed or skipped")
    return EXIT_ERROR if failed else EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    return run_etcd(cmd_check_etcd, args)


def global_options(opts: Options) -> None:
    """Options valid before or after any subcommand (``gpuctl nodes -o json``)."""
    opts.add_argument("-o", "--output", choices=["table", "json"], default="table")
    opts.add_argument(
        "--agent", default=os.environ.get("GPUFLEET_AGENT", "http://127.0.0.1:8080"), help="agent base URL"
    )
    e = opts.group("etcd (cluster commands)")
    e.add_argument("--etcd", default=os.environ.get("GPUFLEET_ETCD"), help="comma-separated endpoint URLs")
    e.add_argument("--cluster", default=os.environ.get("GPUFLEET_CLUSTER", "default"))
    e.add_argument("--cacert", help="CA bundle for https endpoints (etcd, and https:// agents and coordinators)")
    e.add_argument("--cert", help="client certificate (etcd, and agents and coordinators with mutual TLS)")
    e.add_argument("--key", help="client certificate key")
    e.add_argument("--user", help="etcd user")
    e.add_argument("--password-file", help="file holding the etcd user's password")
    e.add_argument("--timeout", type=float, default=5.0, help="deadline of each etcd call in seconds")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="gpuctl", description="Inspect and operate gpufleet.")
    add_version(p)
    sub = p.add_subparsers(dest="cmd", required=True)
    nodes = sub.add_parser("nodes", help="nodes registered in etcd")
    nodes.set_defaults(func=cmd_nodes)
    sub.add_parser("routes", help="the coordinator's route table").set_defaults(func=cmd_routes)
    from gpuctl.cmd_models import add_model_commands

    add_model_commands(sub)
    from gpuctl.cmd_config import add_config_commands

    add_config_commands(sub)
    from gpuctl.cmd_keys import add_key_commands

    add_key_commands(sub)
    from gpuctl.cmd_usage import add_usage_commands

    add_usage_commands(sub)
    from gpuctl.cmd_files import add_file_commands

    add_file_commands(sub)
    status_token = (
        'file holding the token of agents and coordinators with [api] status_access = "token" '
        "(the status token or the admin token; or $GPUFLEET_STATUS_TOKEN)"
    )
    check = sub.add_parser("check", help="production-readiness checklist (exit 1 on any failure)")
    check.add_argument("--token-file", help=status_token)
    check.set_defaults(func=cmd_check)
    drain = sub.add_parser("drain", help="take a node out of rotation (no new requests)")
    drain.add_argument("node")
    drain.add_argument("--reason", help="why (shown in the drain record)")
    drain.set_defaults(func=cmd_drain)
    undrain = sub.add_parser("undrain", help="put a drained node back into rotation")
    undrain.add_argument("node")
    undrain.set_defaults(func=cmd_drain)
    status = sub.add_parser(
        "status", help="with --etcd: leader, nodes and routes of the cluster; otherwise one agent's GPUs and instances"
    )
    status.add_argument("--token-file", help=status_token)
    status.set_defaults(func=cmd_status)
    inst = sub.add_parser("instance", help="start/stop/restart an instance (admin token needed)")
    inst.add_argument("action", choices=["start", "stop", "restart"])
    inst.add_argument("name")
    inst.add_argument("--token-file", help="file holding the admin token (or $GPUFLEET_ADMIN_TOKEN)")
    inst.set_defaults(func=cmd_instance)
    demo = sub.add_parser(
        "demo", help="a whole local cluster (etcd, 2 coordinators, 3 agents) with simulated GPUs and model servers"
    )
    demo.add_argument("--standalone", action="store_true", help="one agent, no etcd (uses --config)")
    demo.add_argument("--config", default=str(DEMO_CONFIG), help="standalone demo config")
    demo.add_argument("--base-port", type=int, default=12379, help="etcd port; agents at +10.., coordinators +20..")
    demo.add_argument("--chaos", type=float, metavar="SECONDS", help="SIGKILL an A100 agent after this long")
    demo.add_argument("--duration", type=float, default=0, help="stop after this many seconds (0 = until Ctrl-C)")
    demo.set_defaults(func=cmd_demo)
    shared_options(p, global_options)  # last: every subcommand registered above accepts them
    return p


def main(argv: list[str] | None = None) -> int:
    from gpufleet.logsetup import configure_logging

    configure_logging("console", "warning")  # library chatter (endpoint switches) stays quiet
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error (one line, see cliargs)
        return EXIT_USAGE if e.code not in (0, None) else EXIT_OK
    try:
        return args.func(args)
    except Unreachable as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `gpuctl keys list | head`: the reader left; that is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    # Through the canonical module, so ``python -m gpuctl.main`` and gpuctl_models share
    # one set of classes (UsageError) instead of __main__'s copies.
    from gpuctl.main import main as canonical_main

    sys.exit(canonical_main())
