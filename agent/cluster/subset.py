"""Which of a model's route slices an agent follows: a deterministic subset, widened when it
cannot serve.

Every agent that forwards a model used to follow all its slices, so each slice write went to
every such agent: with 1,000 agents serving one model, one 12 KB slice became 12 MB of watch
traffic, and etcd spent two cores sending it (docs/benchmarks.md, "Scale"). A proxy needs
*enough* endpoints to spread its forwarded requests and to fail over, not all of them. As
Google's deterministic subsetting does for backends, each agent follows ``size`` consecutive
slices of the model (``[cluster] route_subset_slices``, 4: up to 400 endpoints); where the window
starts is chosen by rendezvous hashing of (node, model, slice), so the agents' windows cover the
slices evenly and each slice goes to about ``agents × size / slices`` of them.

The window is consecutive so that it is one etcd range watch (two when it wraps past the last
slice). Rendezvous hashing keeps windows still when the slice list changes: a new slice becomes
the start of about 1 / slices of the windows, and moves the windows that wrapped past it; the
other windows stay (``floor(u × slices)`` would move half of them, and every moved window is an
etcd relist of its slices).

A subset must never make a request fail that the whole route could serve: the agent follows
every slice (``widen``) while its subset has no READY endpoint on another node of a GPU class
the proxy would pick (remote.py's rule: this node's classes where the cluster has them READY,
per the header's ``ready_classes``; any class otherwise), and narrows back once the subset's
part of the whole route has one again.

Pure: no I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from gpufleet.keyspace.records import RouteRecord

__all__ = ["subset_window", "usable", "window_runs"]


def _score(key: bytes, n: int) -> bytes:
    """The rendezvous score of slice ``n`` for a node and model (the same in every process and
    release: not Python's salted ``hash``)."""
    return hashlib.blake2b(n.to_bytes(4, "big"), digest_size=8, key=key).digest()


def subset_window(node_id: str, model: str, slices: list[int], size: int) -> tuple[int, ...] | None:
    """The slice numbers ``node_id`` follows of ``model``'s ``slices`` (the header's list, in
    order); None for all of them (``size`` 0, or no fewer slices than ``size``)."""
    count = len(slices)
    if size <= 0 or count <= size:
        return None
    key = hashlib.blake2b(f"{node_id}\0{model}".encode(), digest_size=16).digest()
    start = max(range(count), key=lambda i: _score(key, slices[i]))
    return tuple(sorted(slices[(start + i) % count] for i in range(size)))


def window_runs(window: Iterable[int], slices: list[int]) -> list[tuple[int, int]]:
    """The window as (first, last) slice numbers of runs consecutive in ``slices``: one range
    watch each (one run, or two when the window wraps)."""
    chosen = set(window)
    runs: list[tuple[int, int]] = []
    prev_chosen = False
    for n in slices:
        if n in chosen:
            if prev_chosen:
                runs[-1] = (runs[-1][0], n)
            else:
                runs.append((n, n))
        prev_chosen = n in chosen
    return runs


def usable(route: RouteRecord, header: RouteRecord, own_classes: set[str], node_id: str) -> bool:
    """Whether ``route`` (a subset of the model's endpoints) serves this node's forwarding as
    well as the whole route would: it has a READY endpoint with a weight on another node, of one
    of this node's classes when the header says the cluster has that class READY. Also True
    when the header says nothing is READY anywhere (widening would not help)."""
    if header.ready_endpoints <= 0 and not header.ready_classes:
        return True
    want = own_classes & header.ready_classes.keys()
    return any(
        e.state == "READY" and e.weight > 0 and e.node != node_id and (not want or e.gpu_class in want)
        for e in route.endpoints
    )
