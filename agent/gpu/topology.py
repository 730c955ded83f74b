"""How a node's GPUs are linked to each other (``GpuRecord.links``), for tensor-parallel placement.

The interconnect does not change while the agent runs, so each source works it out once per
GPU set, not on every sample. From NVML: NVLink between two GPUs from
``nvmlDeviceGetP2PStatus(..., NVML_P2P_CAPS_INDEX_NVLINK)`` (which also sees NVLink through
NVSwitch), or, where a driver does not answer that, from each link's state and remote PCI
address (direct NVLink bridges only); the PCIe level from ``nvmlDeviceGetTopologyCommonAncestor``.
Whatever NVML cannot tell stays ``LINK_UNKNOWN`` (no preference), and the reason goes into
the problems returned, which the caller logs once. Simulated GPUs declare their links in the
config; real GPUs never get invented ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from agent.config import SimulatedGpu
from gpufleet.keyspace.records import (
    LINK_HOST_BRIDGE,
    LINK_NUMA_NODE,
    LINK_NVLINK,
    LINK_PCIE_SWITCH,
    LINK_PCIE_SWITCHES,
    LINK_SELF,
    LINK_SYSTEM,
    LINK_UNKNOWN,
)

Rows = list[list[int]]  # rows[i][j]: the link level between GPU i and GPU j


def _unknown_rows(n: int) -> Rows:
    return [[LINK_SELF if i == j else LINK_UNKNOWN for j in range(n)] for i in range(n)]


def published(rows: Rows) -> Rows:
    """What goes into the records: [] per GPU when nothing about any pair is known."""
    known = any(level not in (LINK_SELF, LINK_UNKNOWN) for row in rows for level in row)
    return rows if known else [[] for _ in rows]


# --- NVML ------------------------------------------------------------------------------------------


def _nvml_levels(nv: Any) -> dict[int, int]:
    names = {
        "NVML_TOPOLOGY_INTERNAL": LINK_PCIE_SWITCH,
        "NVML_TOPOLOGY_SINGLE": LINK_PCIE_SWITCH,
        "NVML_TOPOLOGY_MULTIPLE": LINK_PCIE_SWITCHES,
        "NVML_TOPOLOGY_HOSTBRIDGE": LINK_HOST_BRIDGE,
        "NVML_TOPOLOGY_NODE": LINK_NUMA_NODE,
        "NVML_TOPOLOGY_SYSTEM": LINK_SYSTEM,
    }
    return {getattr(nv, name): level for name, level in names.items() if hasattr(nv, name)}


def nvml_links(nv: Any, handles: Sequence[Any | None]) -> tuple[Rows, list[str]]:
    """Rows by GPU index for ``handles`` (None: a GPU without a handle, its pairs unknown), and
    what NVML could not answer. NVML errors become problems and unknown levels, never raised."""
    n = len(handles)
    rows = _unknown_rows(n)
    problems: list[str] = []
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n) if handles[i] is not None and handles[j] is not None]
    if not pairs:
        return rows, problems
    nvlinked = _nvlink_pairs(nv, handles, pairs, problems)
    if nvlinked is None:
        # Not knowing which pairs have NVLink, a PCIe level would rank an NVLink pair below a
        # PCIe-switch one: say nothing rather than something misleading.
        return rows, problems
    ancestor = getattr(nv, "nvmlDeviceGetTopologyCommonAncestor", None)
    levels = _nvml_levels(nv)
    failed = None
    for i, j in pairs:
        level = LINK_UNKNOWN
        if (i, j) in nvlinked:
            level = LINK_NVLINK
        elif ancestor is not None and failed is None:
            try:
                level = levels.get(ancestor(handles[i], handles[j]), LINK_UNKNOWN)
            except nv.NVMLError as err:
                failed = f"nvmlDeviceGetTopologyCommonAncestor: {err}"  # the same for every pair
        rows[i][j] = rows[j][i] = level
    if ancestor is None:
        problems.append("nvmlDeviceGetTopologyCommonAncestor: not in this pynvml")
    elif failed is not None:
        problems.append(failed)
    return rows, problems


def _nvlink_pairs(
    nv: Any, handles: Sequence[Any | None], pairs: list[tuple[int, int]], problems: list[str]
) -> set[tuple[int, int]] | None:
    """The pairs linked by NVLink; None when NVML cannot say."""
    p2p = getattr(nv, "nvmlDeviceGetP2PStatus", None)
    cap = getattr(nv, "NVML_P2P_CAPS_INDEX_NVLINK", None)
    ok = getattr(nv, "NVML_P2P_STATUS_OK", 0)
    if p2p is not None and cap is not None:
        try:
            return {(i, j) for i, j in pairs if p2p(handles[i], handles[j], cap) == ok}
        except nv.NVMLError as err:
            problems.append(f"nvmlDeviceGetP2PStatus: {err}")
    else:
        problems.append("nvmlDeviceGetP2PStatus: not in this pynvml")
    try:
        return _nvlink_pairs_by_remote_pci(nv, handles)
    except (nv.NVMLError, AttributeError) as err:
        problems.append(f"NVLink state: {err}")
        return None


def _bus_id(value: str | bytes) -> tuple[int, ...] | str:
    # GetPciInfo says "00000000:07:00.0", a remote link may say "0000:07:00.0": compare numbers.
    text = (value.decode(errors="replace") if isinstance(value, bytes) else value).strip().lower()
    try:
        domain, bus, rest = text.split(":")
        dev, fn = rest.split(".")
        return (int(domain, 16), int(bus, 16), int(dev, 16), int(fn, 16))
    except ValueError:
        return text


def _nvlink_pairs_by_remote_pci(nv: Any, handles: Sequence[Any | None]) -> set[tuple[int, int]]:
    """NVLink pairs from each GPU's enabled links and the PCI address at their far end. A link to
    an NVSwitch names the switch, not a GPU: such pairs are missed (they keep their PCIe level)."""
    by_bus = {_bus_id(nv.nvmlDeviceGetPciInfo(h).busId): i for i, h in enumerate(handles) if h is not None}
    found: set[tuple[int, int]] = set()
    for i, h in enumerate(handles):
        if h is None:
            continue
        for link in range(nv.NVML_NVLINK_MAX_LINKS):
            try:
                if nv.nvmlDeviceGetNvLinkState(h, link) != nv.NVML_FEATURE_ENABLED:
                    continue
            except (nv.NVMLError_NotSupported, nv.NVMLError_InvalidArgument):
                break  # no NVLink on this GPU, or no link with this number: no more links
            j = by_bus.get(_bus_id(nv.nvmlDeviceGetNvLinkRemotePciInfo(h, link).busId))
            if j is not None and j != i:
                found.add((min(i, j), max(i, j)))
    return found


# --- simulated -------------------------------------------------------------------------------------


def _simulated_pair(a: SimulatedGpu, b: SimulatedGpu) -> int:
    if a.nvlink_island is not None and a.nvlink_island == b.nvlink_island:
        return LINK_NVLINK
    if a.pcie_switch is not None and a.pcie_switch == b.pcie_switch:
        return LINK_PCIE_SWITCH
    if a.numa_node is not None and b.numa_node is not None:
        return LINK_NUMA_NODE if a.numa_node == b.numa_node else LINK_SYSTEM
    return LINK_UNKNOWN


def simulated_links(gpus: Sequence[SimulatedGpu]) -> Rows:
    """Rows from the declared ``nvlink_island`` / ``pcie_switch`` / ``numa_node`` of each GPU."""
    rows = _unknown_rows(len(gpus))
    for i, a in enumerate(gpus):
        for j in range(i + 1, len(gpus)):
            rows[i][j] = rows[j][i] = _simulated_pair(a, gpus[j])
    return rows
