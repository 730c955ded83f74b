"""GPU interconnect: the set choice (coordinator/policy/gpusets.py) and the record field
(``GpuRecord.links``) across agent and coordinator versions. The probe is in test_gpu_probe.py,
placement tables in test_placement.py, end to end in test_tensor_parallel.py."""

from __future__ import annotations

import random
from itertools import combinations

import msgspec
import pytest

from coordinator.policy.gpusets import EXACT_SETS, Links, _exact, _greedy, choose, link, links_from_rows, worst
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


def tree_links(n: int, rng: random.Random) -> Links:
    """A random machine as NVML describes one: sockets > host bridges > PCIe switches, NVLink
    islands within a socket. The levels nest, as NVML's common ancestors do."""
    socket = [rng.randrange(2) for _ in range(n)]
    bridge = [s * 10 + rng.randrange(2) for s in socket]
    switch = [b * 10 + rng.randrange(2) for b in bridge]
    island = [s * 10 + rng.randrange(3) if rng.random() < 0.7 else None for s in socket]

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


@pytest.mark.parametrize("seed", range(40))
def test_exact_and_greedy_find_the_best_set_on_nested_topologies(seed: int) -> None:
    rng = random.Random(seed)
    k = rng.randint(4, 12)
    n = rng.randint(2, k - 1)
    links = tree_links(k, rng)
    ranked = rng.sample(range(k), k)  # a memory order
    want_level, want_last = brute(ranked, n, links)
    level, picks = choose(ranked, n, links)
    assert level == want_level == worst(links, [ranked[p] for p in picks])
    d = [[link(links, a, b) for b in ranked] for a in ranked]
    assert _exact(d, k, n)[0] == want_level and _exact(d, k, n)[1][-1] == want_last
    g_level, g_picks = _greedy(d, k, n)
    assert g_level == want_level and len(set(g_picks)) == n  # the level always; memory is best effort


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


def test_greedy_is_used_beyond_the_exact_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    from math import comb

    import coordinator.policy.gpusets as gpusets

    assert comb(8, 4) <= EXACT_SETS < comb(16, 8)  # 8 GPUs: every set; 16 choose 8: greedy

    def no_exact(*args: object) -> None:
        raise AssertionError("12,870 sets compared")

    monkeypatch.setattr(gpusets, "_exact", no_exact)
    # Two interleaved islands (even, odd): the eight freest (0..7) straddle them.
    rows = {i: [LINK_SELF if i == j else LINK_NVLINK if i % 2 == j % 2 else LINK_SYSTEM for j in range(16)]
            for i in range(16)}  # fmt: skip
    links = links_from_rows(rows)
    level, picks = choose(list(range(16)), 8, links)
    assert (level, picks) == (LINK_NVLINK, [0, 2, 4, 6, 8, 10, 12, 14])


def test_short_rows_and_odd_pairs_are_unknown() -> None:
    links = links_from_rows({0: [0, LINK_NVLINK], 1: [LINK_SYSTEM, 0, LINK_SYSTEM], -1: [1, 1], 5000: [1]})
    assert link(links, 0, 1) == link(links, 1, 0) == LINK_NVLINK  # the lower index's row decides
    assert link(links, 0, 2) == LINK_UNKNOWN  # GPU 0's row is short
    assert link(links, 2, 1) == LINK_SYSTEM
    assert link(links, 3, 3) == LINK_SELF and link(links, 7, 1) == LINK_UNKNOWN
    assert len(links) == 128  # a malformed index does not size the table


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
