"""``gpuctl models add|list|rm|digest``: the model registry under ``/gpufleet/<cluster>/models/``.

``add`` validates the entry here, before it reaches etcd (the leader would only log and skip
a bad one), refuses a ``--max-replicas`` that the registered nodes could never hold, and
refuses to overwrite an existing model unless ``--update`` is given: two operators registering
the same name should not silently replace each other's path. ``list`` joins the registry with
the leader's placement result (with each scaling decision) and the agents' path checks, so one
command answers "where is it running, and if not, why not".
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from gpufleet.etcd import Compare, EtcdClient, Op
from gpufleet.facts import BACKENDS, DEFAULT_BACKEND
from gpufleet.keyspace import InvalidName, Keyspace, check_model, decode_or_skip, encode
from gpufleet.keyspace.records import ModelRecord, NodeRecord, PlacementRecord
from gpufleet.registry import (
    autoscaled,
    fleet_problems,
    max_replicas,
    min_replicas,
    model_digest,
    model_size,
    on_demand,
    validate_model,
)

from . import common as ctl


def _model_from_args(args: argparse.Namespace) -> ModelRecord:
    classes = [c.strip() for c in (args.classes or "").split(",") if c.strip()]
    rec = ModelRecord(
        name=args.name,
        path=args.path,
        backend=args.backend,
        replicas=args.replicas,
        gpus_per_replica=args.gpus_per_replica,
        min_vram_gib=args.min_vram_gib,
        classes=classes,
        size_bytes=args.size_bytes,
        sha256=args.sha256.lower() if args.sha256 else None,
        fallback=args.fallback,
        args=list(args.arg or []),
        gpu_memory_fraction=args.gpu_memory_fraction,
        created_at=time.time(),
        min_replicas=args.min_replicas,
        idle_unload_after_s=args.idle_unload_after,
        max_replicas=args.max_replicas,
        scale_up_waiting=args.scale_up_waiting,
        scale_up_after_s=args.scale_up_after,
        scale_down_waiting=args.scale_down_waiting,
        scale_down_after_s=args.scale_down_after,
        scale_cooldown_s=args.scale_cooldown,
    )
    if problems := validate_model(rec):
        raise ctl.UsageError("invalid model: " + "; ".join(problems))
    return rec


async def _add(etcd: EtcdClient, keys: Keyspace, args: argparse.Namespace) -> int:
    rec = args.record
    key = keys.model(rec.name)
    if autoscaled(rec):  # max_replicas that the registered nodes can never hold is a mistake
        nodes = ctl.decode_all((await etcd.get_prefix(keys.nodes)).kvs, NodeRecord)
        if problems := fleet_problems(rec, nodes):
            print("error: invalid model: " + "; ".join(problems), file=sys.stderr)
            return ctl.EXIT_ERROR
    if args.update:
        await etcd.put(key, encode(rec))
        verb = "updated"
    else:
        res = await etcd.txn([Compare.absent(key)], [Op.put(key, encode(rec))])
        if not res.succeeded:
            print(f"error: model {rec.name} is already registered (use --update to replace it)", file=sys.stderr)
            return ctl.EXIT_ERROR
        verb = "registered"
    if rec.fallback is not None and await etcd.get(keys.model(rec.fallback)) is None:
        print(f"warning: fallback {rec.fallback} is not a registered model", file=sys.stderr)
    demand = ""
    if on_demand(rec):
        demand = f", {min_replicas(rec)} while idle for {rec.idle_unload_after_s:g} s (on demand)"
    if autoscaled(rec):
        demand += f", up to {max_replicas(rec)} under load (autoscaled)"
    print(f"model {rec.name} {verb}: {rec.replicas} replica(s){demand} of {rec.path} ({rec.backend})")
    return ctl.EXIT_OK


def cmd_add(args: argparse.Namespace) -> int:
    args.record = _model_from_args(args)
    return ctl.run_etcd(_add, args)


async def _rm(etcd: EtcdClient, keys: Keyspace, args: argparse.Namespace) -> int:
    res = await etcd.delete(keys.model(args.name))
    if not res.deleted:
        print(f"error: model {args.name} is not registered", file=sys.stderr)
        return ctl.EXIT_ERROR
    print(f"model {args.name} removed: its replicas stop once the leader updates the assignments")
    return ctl.EXIT_OK


def cmd_rm(args: argparse.Namespace) -> int:
    try:
        check_model(args.name)
    except InvalidName as e:
        raise ctl.UsageError(str(e)) from None
    return ctl.run_etcd(_rm, args)


def model_rows(
    registered: list[ModelRecord], placement: PlacementRecord | None, nodes: list[NodeRecord]
) -> list[dict[str, Any]]:
    placed = {p.model: p for p in (placement.models if placement else [])}
    rows = []
    for m in registered:
        p = placed.get(m.name)
        checks = [(n.node, a) for n in nodes for a in n.models if a.model == m.name]
        rows.append(
            {
                "model": m,
                "nodes": p.nodes if p else [],
                "unplaced": p.unplaced if p else None,
                "reasons": p.reasons if p else ["not placed yet (is a coordinator leading?)"],
                "scaling": p.scaling if p else "",
                "path_available_on": sorted(node for node, a in checks if a.available),
                "path_unavailable_on": {node: a.error or "unavailable" for node, a in checks if a.available is False},
            }
        )
    return rows


def format_models(rows: list[dict[str, Any]]) -> str:
    table = []
    notes = []
    for r in rows:
        m: ModelRecord = r["model"]
        table.append(
            [
                m.name,
                m.backend,
                f"{len(r['nodes'])}/{m.replicas}",
                str(m.gpus_per_replica),
                ",".join(m.classes) or "any",
                "-" if m.min_vram_gib is None else f"{m.min_vram_gib:g}",
                m.fallback or "-",
                ",".join(r["nodes"]) or "-",
                m.path,
            ]
        )
        if r.get("scaling"):
            kind = ", ".join(k for k, on in (("on demand", on_demand(m)), ("autoscaled", autoscaled(m))) if on)
            notes.append(f"{m.name}: {kind}, {r['scaling']}")
        notes.extend(f"{m.name}: {reason}" for reason in r["reasons"])
        notes.extend(f"{m.name}: path unavailable on {node}: {err}" for node, err in r["path_unavailable_on"].items())
    head = ["MODEL", "BACKEND", "PLACED", "GPUS", "CLASSES", "VRAM GiB", "FALLBACK", "NODES", "PATH"]
    text = ctl.render_table(table, head)
    return text + ("\n\n" + "\n".join(notes) if notes else "")


async def _list(etcd: EtcdClient, keys: Keyspace, args: argparse.Namespace) -> int:
    registered = sorted(ctl.decode_all((await etcd.get_prefix(keys.models)).kvs, ModelRecord), key=lambda m: m.name)
    nodes = ctl.decode_all((await etcd.get_prefix(keys.nodes)).kvs, NodeRecord)
    kv = await etcd.get(keys.placement)
    placement = decode_or_skip(keys.placement, kv.value, PlacementRecord, kv.mod_revision) if kv else None
    rows = model_rows(registered, placement, nodes)
    ctl.emit(args, rows, format_models(rows) if rows else f"no models registered in cluster {keys.cluster!r}")
    return ctl.EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    return ctl.run_etcd(_list, args)


def cmd_digest(args: argparse.Namespace) -> int:
    try:
        size, digest = model_size(args.path), model_digest(args.path)
    except OSError as e:
        print(f"error: {args.path}: {e.strerror or e}", file=sys.stderr)
        return ctl.EXIT_ERROR
    ctl.emit(args, {"path": args.path, "size_bytes": size, "sha256": digest}, f"{digest}  {size}  {args.path}")
    return ctl.EXIT_OK


def add_model_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    models_parser = sub.add_parser("models", help="the model registry (models on shared storage)")
    msub = models_parser.add_subparsers(dest="models_cmd", required=True)
    add = msub.add_parser("add", help="register a model; the leader places its replicas")
    add.add_argument("name", help="the model name clients ask for")
    add.add_argument("--path", required=True, help="absolute path on shared storage, the same on every host")
    add.add_argument("--backend", choices=BACKENDS, default=DEFAULT_BACKEND)
    add.add_argument("--replicas", type=int, default=1)
    add.add_argument(
        "--gpus-per-replica", type=int, default=1, help="GPUs one replica spans, tensor parallel (one class, one node)"
    )
    add.add_argument(
        "--min-vram-gib", type=float, help="GPU memory one replica needs on each of its GPUs (default: a whole GPU)"
    )
    add.add_argument("--gpu-memory-fraction", type=float, help="share of the GPU to give the backend")
    add.add_argument("--classes", help="allowed GPU classes, comma-separated (default: any)")
    add.add_argument("--size-bytes", type=int, help="checked by each agent before it starts the model")
    add.add_argument("--sha256", help="checked once by each agent (see `gpuctl models digest`)")
    add.add_argument("--fallback", help="model that answers at degradation level 2")
    add.add_argument(
        "--arg", action="append", help="extra backend argument, repeatable; write flags as --arg=--max-model-len=8192"
    )
    add.add_argument(
        "--min-replicas",
        type=int,
        help="replicas kept while nobody asks for the model (0: loaded on its first request); default: --replicas",
    )
    add.add_argument(
        "--idle-unload-after",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="with --min-replicas: scale down after this long without a request (default 600)",
    )
    add.add_argument(
        "--max-replicas",
        type=int,
        help="autoscale: up to this many replicas while the backends' queues stay long (default: --replicas)",
    )
    add.add_argument(
        "--scale-up-waiting",
        type=float,
        default=2.0,
        metavar="N",
        help="with --max-replicas: mean requests waiting per READY replica above which load is high (default 2)",
    )
    add.add_argument(
        "--scale-up-after",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="with --max-replicas: one replica more after load stayed high this long (default 30)",
    )
    add.add_argument(
        "--scale-down-waiting",
        type=float,
        default=0.5,
        metavar="N",
        help="with --max-replicas: mean requests waiting per READY replica at or below which load is low (default 0.5)",
    )
    add.add_argument(
        "--scale-down-after",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="with --max-replicas: one idle replica less after load stayed low this long (default 300)",
    )
    add.add_argument(
        "--scale-cooldown",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="with --max-replicas: at most one scaling change this often (default 120)",
    )
    add.add_argument("--update", action="store_true", help="replace an existing registration")
    add.set_defaults(func=cmd_add)
    msub.add_parser("list", help="registered models, where they run, and why not").set_defaults(func=cmd_list)
    rm = msub.add_parser("rm", help="unregister a model (its replicas are stopped)")
    rm.add_argument("name")
    rm.set_defaults(func=cmd_rm)
    digest = msub.add_parser("digest", help="size and sha256 of a model file or directory, for `add`")
    digest.add_argument("path")
    digest.set_defaults(func=cmd_digest)
