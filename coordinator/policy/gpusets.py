"""Which N GPUs of a node a tensor-parallel replica spans: the set whose worst link is best.

A replica split over N GPUs exchanges activations between every pair of them on every layer, so
it runs at the pace of its slowest link. Among the GPUs that fit (placement.py decides that),
the chosen set is the one with the lowest worst-pair link level (``GpuRecord.links``: NVLink <
one PCIe switch < several < host bridge < NUMA node < across sockets < unknown), then the most
free memory on its least free GPU, then the set placement chose before topology was known (the
N with most free memory, lowest index first), so a node whose agent reports no topology gets
exactly that choice.

Cost, per node and model, for k fitting GPUs of a class. The groups of GPUs linked at each level
or better are worked out once per node and pass. Where the links nest (NVML's PCIe levels form a
tree; NVSwitch links all GPUs; NVLink islands inside one PCIe switch), the first N GPUs of a group
in memory order are linked at its level throughout, and the choice is one walk over the k GPUs
per level: O(levels x k), exact. Where they do not for the GPUs at hand (a partial NVLink mesh
such as DGX-1's, NVLink bridges between cards on different PCIe switches, a GPU with unknown
links): the k x k link table; nothing more when the N freest already have the best link among
the candidates; else every set is compared while there are at most ``EXACT_SETS`` (8 GPUs: at
most 70 sets), and beyond that a greedy growth from each GPU as seed (O(k^2 N)), which finds the
best level on nested links but may miss the best set of a crossing mesh of more than 8 GPUs.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from math import comb

from gpufleet.keyspace.records import LINK_SELF, LINK_UNKNOWN, NodeRecord

EXACT_SETS = 128
_MAX_INDEX = 128  # GPU indexes from here on (a malformed record) have unknown links


class Links:
    """A node's links: ``table[a][b]``, the level between GPUs a and b by GPU index, and for
    each level present (ascending) which group every GPU falls in when GPUs linked at that
    level or better are joined. Built once per node and pass."""

    __slots__ = ("_groups", "table")

    def __init__(self, table: list[list[int]]) -> None:
        self.table = table
        self._groups: list[tuple[int, list[int]]] | None = None

    @property
    def groups(self) -> list[tuple[int, list[int]]]:
        # Only a choice needs them, not a status line's look at a placed replica's links.
        if self._groups is None:
            self._groups = _groups(self.table)
        return self._groups


def _groups(table: list[list[int]]) -> list[tuple[int, list[int]]]:
    """(level, group of each GPU) for each level in the table, ascending (Kruskal's order)."""
    size = len(table)
    parent = list(range(size))

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = a = parent[parent[a]]
        return a

    pairs = sorted((table[a][b], a, b) for a in range(size) for b in range(a + 1, size))
    out: list[tuple[int, list[int]]] = []
    for i, (level, a, b) in enumerate(pairs):
        parent[root(a)] = root(b)
        if i + 1 == len(pairs) or pairs[i + 1][0] != level:
            out.append((level, [root(g) for g in range(size)]))
    return out


def links_from_rows(rows: dict[int, list[int]]) -> Links:
    """One symmetric table from the GPUs' rows (``GpuRecord.links`` by GPU index); where two rows
    disagree, the lower index's row decides. Pairs no row covers are LINK_UNKNOWN."""
    size = min(max(rows, default=-1) + 1, _MAX_INDEX)
    table = [[LINK_SELF if a == b else LINK_UNKNOWN for b in range(size)] for a in range(size)]
    for lo, row in rows.items():
        if not 0 <= lo < size:
            continue
        for hi in range(lo + 1, min(len(row), size)):
            table[lo][hi] = table[hi][lo] = row[hi]
    return Links(table)


def node_links(rec: NodeRecord) -> Links | None:
    """The node's links; None when it reports none at all (topology unknown)."""
    rows = {g.index: g.links for g in rec.gpus if g.links}
    return links_from_rows(rows) if rows else None


def link(links: Links, a: int, b: int) -> int:
    if a == b:
        return LINK_SELF
    size = len(links.table)
    return links.table[a][b] if 0 <= a < size and 0 <= b < size else LINK_UNKNOWN


def worst(links: Links | None, gpus: Sequence[int]) -> int:
    """The worst link level between any two of ``gpus``."""
    if len(gpus) < 2:
        return LINK_SELF
    if links is None:
        return LINK_UNKNOWN
    return max(link(links, a, b) for a, b in combinations(gpus, 2))


def choose(ranked: Sequence[int], n: int, links: Links | None) -> tuple[int, list[int]]:
    """(worst link level, positions in ``ranked`` of the N chosen, ascending) for GPU indexes
    ``ranked`` best first by memory (most free, then lowest index); ``len(ranked) >= n``."""
    top = list(range(n))
    if n < 2:
        return LINK_SELF, top
    if links is None:
        return LINK_UNKNOWN, top
    if (found := _by_groups(ranked, n, links)) is not None:
        return found
    k = len(ranked)
    d = [[link(links, a, b) for b in ranked] for a in ranked]  # by position: k^2 lookups
    top_level = max(d[a][b] for a, b in combinations(top, 2))
    floor = min(d[a][b] for a in range(k) for b in range(a + 1, k))
    if top_level <= floor:
        return top_level, top
    return _exact(d, k, n) if comb(k, n) <= EXACT_SETS else _greedy(d, k, n)


def _by_groups(ranked: Sequence[int], n: int, links: Links) -> tuple[int, list[int]] | None:
    """The answer in O(levels x k) when the links nest (every group is linked at its level or
    better throughout: NVML's tree, NVSwitch); None when they do not here.

    Any N GPUs linked at level L or better lie in one group of level L, so at the lowest level
    where a group has N of the candidates, the best set is the first group to collect N in
    memory order: its first N, if they are all linked at L or better (else: not nested)."""
    size = len(links.table)
    for level, group in links.groups:
        members: dict[int, list[int]] = {}
        for pos, g in enumerate(ranked):
            key = group[g] if 0 <= g < size else -1 - g  # a GPU beyond the table: alone
            got = members.setdefault(key, [])
            got.append(pos)
            if len(got) == n:
                gpus = [ranked[p] for p in got]
                return (level, got) if worst(links, gpus) <= level else None
    return None


def _exact(d: list[list[int]], k: int, n: int) -> tuple[int, list[int]]:
    # Key (worst level, last position): the last position is the least free GPU of the set, and
    # the first set in lexicographic order wins a tie, as the memory-only choice would.
    best: tuple[int, int] | None = None
    chosen: tuple[int, ...] = ()
    for c in combinations(range(k), n):
        w = LINK_SELF
        for i in range(n):
            for j in range(i + 1, n):
                w = max(w, d[c[i]][c[j]])
            if best is not None and w > best[0]:
                break  # worse already: this set cannot win
        if best is None or (w, c[-1]) < best:
            best, chosen = (w, c[-1]), c
    assert best is not None
    return best[0], list(chosen)


def _greedy(d: list[list[int]], k: int, n: int) -> tuple[int, list[int]]:
    # From each seed, add the GPU whose worst link to those chosen is best (ties: more free).
    best: tuple[int, int, list[int]] | None = None
    for seed in range(k):
        chosen = [seed]
        reach = list(d[seed])  # each GPU's worst link to the chosen ones
        w = LINK_SELF
        for _ in range(n - 1):
            c = min((p for p in range(k) if p not in chosen), key=lambda p: (reach[p], p))
            w = max(w, reach[c])
            chosen.append(c)
            reach = [max(r, x) for r, x in zip(reach, d[c], strict=True)]
        chosen.sort()
        key = (w, chosen[-1], chosen)
        if best is None or key < best:
            best = key
    assert best is not None
    return best[0], best[2]
