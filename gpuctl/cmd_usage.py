"""``gpuctl usage [KEY] [--model M] [--since 24h] [-o json]``: requests and tokens per API key and
model, summed over every node's usage record (``/gpufleet/<cluster>/usage/<node>``, nodes that
have left included), or a standalone agent's own (``--state-dir DIR``: its rolled-up record plus
the journal lines not rolled up yet, so it is exact to the last request).

The key is a positional filter: ``--key`` is already the etcd client certificate's key among
the global options. A cluster's records are rolled up every few seconds (agent/keys/rollup.py),
so the newest requests show up that much later. ``--since`` counts whole hours (the hour the
window starts in counts in full); hours older than a week are kept only as totals, which count
without ``--since``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import msgspec

from agent.keys.journal import read_journal_id, read_segments, totals_after
from agent.keys.rollup import KEEP_HOURS_S, ROLLED_FILE, UsageStoreError, merged, read_rolled
from gpufleet.apikeys import parse_duration
from gpufleet.etcd import EtcdClient
from gpufleet.keyspace import Keyspace
from gpufleet.keyspace.records import UsageRecord

from . import common as ctl


class UsageLine(msgspec.Struct, kw_only=True):
    key: str
    model: str
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class UsageReport(msgspec.Struct, kw_only=True):
    since: float | None  # unix time of the first hour counted; None: since the start
    nodes: list[str]  # whose records were summed
    usage: list[UsageLine]
    total: UsageLine


def _add(into: dict[tuple[str, str], list[int]], key: str, model: str, counts: list[int]) -> None:
    acc = into.setdefault((key, model), [0, 0, 0, 0])
    for i in range(4):
        acc[i] += counts[i]


def report(
    records: list[UsageRecord], since_s: float | None, key: str | None, model: str | None, now: float
) -> UsageReport:
    """The records summed per key and model, filtered (pure)."""
    first_hour = None if since_s is None else int((now - since_s) // 3600) * 3600
    sums: dict[tuple[str, str], list[int]] = {}
    for rec in records:
        for row in rec.rows:
            if (key is not None and row.key != key) or (model is not None and row.model != model):
                continue
            if first_hour is not None and row.hour < first_hour:
                continue  # includes hour 0: the folded totals of older hours
            _add(sums, row.key, row.model, [row.requests, row.errors, row.prompt_tokens, row.completion_tokens])
    lines = [
        UsageLine(key=k, model=m, requests=r, errors=e, prompt_tokens=p, completion_tokens=c, total_tokens=p + c)
        for (k, m), (r, e, p, c) in sorted(sums.items())
    ]
    total = UsageLine(key="*", model="*")
    for line in lines:
        total.requests += line.requests
        total.errors += line.errors
        total.prompt_tokens += line.prompt_tokens
        total.completion_tokens += line.completion_tokens
    total.total_tokens = total.prompt_tokens + total.completion_tokens
    return UsageReport(since=first_hour, nodes=sorted(r.node for r in records), usage=lines, total=total)


def format_report(rep: UsageReport) -> str:
    def row(u: UsageLine) -> list[str]:
        n = [u.requests, u.errors, u.prompt_tokens, u.completion_tokens, u.total_tokens]
        return [u.key, u.model, *(f"{v:,}" for v in n)]

    header = ["KEY", "MODEL", "REQUESTS", "ERRORS", "PROMPT", "COMPLETION", "TOTAL TOKENS"]
    when = (
        "since the start"
        if rep.since is None
        else "since " + time.strftime("%Y-%m-%d %H:00 UTC", time.gmtime(rep.since))
    )
    total = msgspec.structs.replace(rep.total, key="(all)", model="")
    table = ctl.render_table([row(u) for u in rep.usage] + [row(total)], header)
    return f"{table}\n\n{len(rep.nodes)} node record(s), {when}"


def local_record(state_dir: Path, now: float) -> UsageRecord:
    """A standalone agent's usage: its rolled-up record plus the journal lines past it."""
    directory = state_dir / "usage"
    if not directory.is_dir():
        raise ctl.UsageError(f"{directory}: no usage journal here (is --state-dir the agent's [agent] state_dir?)")
    try:
        rolled = read_rolled(directory / ROLLED_FILE)
    except UsageStoreError as e:
        raise ctl.UsageError(str(e)) from None
    journal_id = read_journal_id(directory) or ""
    mark = rolled.journals.get(journal_id) if rolled is not None else None
    covered = mark.covers if mark is not None else 0
    adding, last = totals_after(read_segments(directory), covered)
    node = rolled.node if rolled is not None else str(state_dir)
    return merged(rolled, node, journal_id, last, adding, now, max_bytes=sys.maxsize)


def cmd_usage(args: argparse.Namespace) -> int:
    try:
        since_s = parse_duration(args.since) if args.since else None
    except ValueError as e:
        raise ctl.UsageError(f"--since: {e}") from None
    if since_s is not None and since_s > KEEP_HOURS_S:
        print(
            f"note: hours are kept for {KEEP_HOURS_S // 86400:.0f} days; older usage counts only without --since",
            file=sys.stderr,
        )

    def show(records: list[UsageRecord]) -> int:
        rep = report(records, since_s, args.name, args.model, time.time())
        ctl.emit(args, rep, format_report(rep))
        return ctl.EXIT_OK

    if args.state_dir:
        return show([local_record(Path(args.state_dir), time.time())])

    async def on_etcd(etcd: EtcdClient, keys: Keyspace, a: argparse.Namespace) -> int:
        res = await etcd.get_prefix(keys.usage)
        return show(ctl.decode_all(res.kvs, UsageRecord))

    return ctl.run_etcd(on_etcd, args)


def add_usage_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("usage", help="requests and tokens per API key and model, summed over the fleet")
    p.add_argument("name", nargs="?", metavar="KEY", help="only this API key")
    p.add_argument("--model", help="only this model")
    p.add_argument("--since", help="only the last DURATION (e.g. 24h, 7d), in whole hours")
    p.add_argument("--state-dir", help="a standalone agent's [agent] state_dir instead of the cluster's etcd")
    p.set_defaults(func=cmd_usage)
