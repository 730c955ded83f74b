"""GPU interconnect: the set choice (coordinator/policy/gpusets.py) and the record field
(``GpuRecord.links``) across agent and coordinator versions. The probe is in test_gpu_probe.py,
placement tables in test_placement.py, end to end in test_tensor_parallel.py."""

from __future__ import annotations

import random
from itertools import combinations

import msgspec
import pytest

from coordinator.policy.gpusets import (
    EXACT_SETS,
    Links,
    _by_groups,
    _exact,
    _greedy,
    choose,
    link,
    links_from_rows,
    worst,
)
from gpufleet.keyspace import decode, encode
from gpufleet.keyspace.records import (
    LINK_HOST_BRIDGE,
    LINK_NUMA_NODE,
    LINK_NVLINK,
    LINK_PCIE_SWITCH,
    LINK_SELF,
    LINK_SYSTEM,
    LINK_UNKNOWN,
    GpuRecord,
    NodeRecord,
)

# --- the set choice --------------------------------------------------------------------------------


def machine_links(n: int, rng: random.Random, nested: bool) -> Links:
    """A random machine as NVML describes one: sockets > host bridges > PCIe switches, plus NVLink
    islands: inside one PCIe switch or over the whole node (NVSwitch) when ``nested``, else
    anywhere within a socket (NVLink bridges between cards on different switches), where the
    NVLink and PCIe groups cross."""
    socket = [rng.randrange(2) for _ in range(n)]
    bridge = [s * 10 + rng.randrange(2) for s in socket]
    switch = [b * 10 + rng.randrange(2) for b in bridge]
    if nested and rng.random() < 0.2:
        island: list[int | None] = [0] * n  # NVSwitch
    else:
        within = switch if nested else socket
        island = [w * 10 + rng.randrange(3) if rng.random() < 0.7 else None for w in within]

    def level(i: int, j: int) -> int:
        if i == j:
            return LINK_SELF
        if island[i] is not None and island[i] == island[j]:
            return LINK_NVLINK
        if switch[i] == switch[j]:
            return LINK_PCIE_SWITCH
        if bridge[i] == bridge[j]:
            return LINK_HOST_BRIDGE
        return LINK_NUMA_NODE if socket[i] == socket[j] else LINK_SYSTEM

    return links_from_rows({i: [level(i, j) for j in range(n)] for i in range(n)})


def brute(ranked: list[int], n: int, links: Links) -> tuple[int, int]:
    """(best worst level, then the least free GPU's position) over every set: the reference."""
    return min((worst(links, [ranked[p] for p in c]), c[-1]) for c in combinations(range(len(ranked)), n))


def first_best(ranked: list[int], n: int, links: Links) -> list[int]:
    """The positions of the first set in memory order with the best (level, least free)."""
    want = brute(ranked, n, links)
    sets = combinations(range(len(ranked)), n)
    return list(next(c for c in sets if (worst(links, [ranked[p] for p in c]), c[-1]) == want))


@pytest.mark.parametrize("seed", range(40))
def test_nested_links_are_answered_by_the_groups_as_by_every_set(seed: int) -> None:
    rng = random.Random(seed)
    k = rng.randint(4, 12)
    n = rng.randint(2, k - 1)
    links = machine_links(k, rng, nested=True)
    ranked = rng.sample(range(k), k)  # a memory order
    found = _by_groups(ranked, n, links)
    assert found is not None
    level, picks = found
    assert (level, picks) == choose(ranked, n, links)
    assert (level, picks) == (brute(ranked, n, links)[0], first_best(ranked, n, links))
    d = [[link(links, a, b) for b in ranked] for a in ranked]
    assert _exact(d, k, n) == (level, picks)
    g_level, g_picks = _greedy(d, k, n)
    assert g_level == level and len(set(g_picks)) == n  # the level always; memory is best effort


@pytest.mark.parametrize("seed", range(40))
def test_crossing_links_up_to_8_gpus_get_the_best_set(seed: int) -> None:
    rng = random.Random(seed)
    k = rng.randint(4, 8)
    n = rng.randint(2, k - 1)
    links = machine_links(k, rng, nested=False)
    ranked = rng.sample(range(k), k)
    level, picks = choose(ranked, n, links)
    assert (level, picks) == (brute(ranked, n, links)[0], first_best(ranked, n, links))


def test_no_links_or_one_gpu_is_the_memory_choice() -> None:
    assert choose([5, 2, 7], 2, None) == (LINK_UNKNOWN, [0, 1])
    assert choose([5, 2, 7], 1, links_from_rows({5: [0] * 8})) == (LINK_SELF, [0])


def test_the_freest_set_is_kept_when_it_is_already_best() -> None:
    flat = links_from_rows({i: [LINK_SELF if i == j else LINK_NVLINK for j in range(8)] for i in range(8)})  # NVSwitch
    assert choose([3, 1, 4, 0, 5, 2, 6, 7], 4, flat) == (LINK_NVLINK, [0, 1, 2, 3])


def test_ties_go_to_the_set_the_memory_order_prefers() -> None:
    # Two NVLink pairs, (0, 1) and (2, 3); the memory order 0, 2, 1, 3: pair (0, 1) ends at position 2,
    # pair (2, 3) at position 3, so (0, 1) has the more free least-free GPU.
    links = links_from_rows({i: [LINK_SELF if i == j else LINK_NVLINK if i // 2 == j // 2 else LINK_SYSTEM
                                 for j in range(4)] for i in range(4)})  # fmt: skip
    assert choose([0, 2, 1, 3], 2, links) == (LINK_NVLINK, [0, 2])


def hybrid_cube_mesh() -> Links:
    """DGX-1: two quads of NVLink-connected GPUs (0-3, 4-7), and each GPU NVLinked to its twin
    in the other quad; PCIe switches pair the GPUs (0-1, 2-3, ...), two pairs share a host
    bridge, the quads sit on two sockets. The NVLink groups do not nest: 0-1 and 0-4 are
    NVLinked, 1-4 not."""
    nvlink = {(a, b) for q in (0, 4) for a, b in combinations(range(q, q + 4), 2)} | {(i, i + 4) for i in range(4)}

    def level(i: int, j: int) -> int:
        if i == j:
            return LINK_SELF
        if (min(i, j), max(i, j)) in nvlink:
            return LINK_NVLINK
        if i // 2 == j // 2:
            return LINK_PCIE_SWITCH
        return LINK_HOST_BRIDGE if i // 4 == j // 4 else LINK_SYSTEM

    return links_from_rows({i: [level(i, j) for j in range(8)] for i in range(8)})


@pytest.mark.parametrize("seed", range(20))
def test_a_partial_nvlink_mesh_is_searched_set_by_set(seed: int) -> None:
    rng = random.Random(seed)
    links = hybrid_cube_mesh()
    ranked = rng.sample(range(8), 8)
    for n in (2, 3, 4):
        level, picks = choose(ranked, n, links)
        assert (level, picks[-1]) == brute(ranked, n, links)
    assert _by_groups([0, 4, 1, 5, 2, 6, 3, 7], 3, links) is None  # 0, 4, 1: NVLink 0-4, 0-1, not 1-4
    assert choose([0, 4, 1, 5, 2, 6, 3, 7], 3, links) == (LINK_NVLINK, [0, 2, 4])  # 0, 1, 2


def test_greedy_is_used_beyond_the_exact_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    from math import comb

    import coordinator.policy.gpusets as gpusets

    assert comb(8, 4) <= EXACT_SETS < comb(16, 8)  # 8 GPUs: every set; 16 choose 8: greedy

    def no_exact(*args: object) -> None:
        raise AssertionError("12,870 sets compared")

    monkeypatch.setattr(gpusets, "_exact", no_exact)

    # An NVLink ring over 16 GPUs (does not nest); PCIe switches hold 0-7 and 8-15. Memory order
    # alternates between the halves, so the eight freest straddle them.
    def level(i: int, j: int) -> int:
        if i == j:
            return LINK_SELF
        if (i - j) % 16 in (1, 15):
            return LINK_NVLINK
        return LINK_PCIE_SWITCH if i // 8 == j // 8 else LINK_SYSTEM

    links = links_from_rows({i: [level(i, j) for j in range(16)] for i in range(16)})
    ranked = [g for pair in zip(range(8), range(8, 16), strict=True) for g in pair]
    level_, picks = choose(ranked, 8, links)
    assert (level_, sorted(ranked[p] for p in picks)) == (LINK_PCIE_SWITCH, list(range(8)))
    # Nested links need neither search: two interleaved islands, answered by the groups.
    monkeypatch.setattr(gpusets, "_greedy", no_exact)
    rows = {i: [LINK_SELF if i == j else LINK_NVLINK if i % 2 == j % 2 else LINK_SYSTEM for j in range(16)]
            for i in range(16)}  # fmt: skip
    assert choose(list(range(16)), 8, links_from_rows(rows)) == (LINK_NVLINK, [0, 2, 4, 6, 8, 10, 12, 14])


def test_short_rows_and_odd_pairs_are_unknown() -> None:
    links = links_from_rows({0: [0, LINK_NVLINK], 1: [LINK_SYSTEM, 0, LINK_SYSTEM], -1: [1, 1], 5000: [1]})
    assert link(links, 0, 1) == link(links, 1, 0) == LINK_NVLINK  # the lower index's row decides
    assert link(links, 0, 2) == LINK_UNKNOWN  # GPU 0's row is short
    assert link(links, 2, 1) == LINK_SYSTEM
    assert link(links, 3, 3) == LINK_SELF and link(links, 7, 1) == LINK_UNKNOWN
    assert len(links.table) == 128  # a malformed index does not size the table


# --- the record field across versions ----------------------------------------------------------


class OldGpuRecord(msgspec.Struct, kw_only=True):
    """GpuRecord as coordinators before ``links`` decode it."""

    index: int
    uuid: str
    name: str
    gpu_class: str
    memory_free_bytes: int | None = None


def test_links_round_trip_and_old_records_decode() -> None:
    g = GpuRecord(index=1, uuid="GPU-1", name="NVIDIA H100", gpu_class="H100", memory_free_bytes=5,
                  links=[LINK_NVLINK, LINK_SELF])  # fmt: skip
    rec = NodeRecord(node="n1", address="http://n1:8080", agent_version="0", started_at=0.0, updated_at=0.0,
                     gpu_source="nvml", gpu_classes=["H100"], gpus=[g], instances=[])  # fmt: skip
    assert decode(encode(rec), NodeRecord).gpus[0].links == [LINK_NVLINK, LINK_SELF]
    # An older coordinator ignores the field; a record from an older agent has none: unknown.
    assert decode(encode(g), OldGpuRecord).memory_free_bytes == 5
    old = msgspec.json.encode(OldGpuRecord(index=0, uuid="GPU-0", name="NVIDIA H100", gpu_class="H100"))
    assert decode(old, GpuRecord).links == []
    # Unknown topology costs no bytes beyond the empty list.
    assert b'"links":[]' in encode(msgspec.structs.replace(g, links=[]))
