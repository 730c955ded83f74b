"""The leader's key-share loop: entry nodes' API-key demand in, ``/state/keyshares`` out.

Every entry node enforces its share of each limited key's fleet-wide limits (agent/keys/gate.py)
and reports the key's use over the last minute in its node record (``key_demand``). Each pass
the leader divides every such key among the entry nodes in proportion to their demand
(``gpufleet.keylimits.divide``; the shares sum to 1, so the fleet can never exceed a limit) and
writes the division, fenced by its epoch, when a share moved by more than ``MIN_MOVE`` of itself
or a key came or went — and at least every ``REFRESH_S``. A key nobody uses any more drops out
(its nodes fall back to an even division). Nothing here is kept between terms: demand is in
the node records, so a new leader divides from what they say.
"""

from __future__ import annotations

import time

import structlog

from gpufleet.etcd import Op
from gpufleet.keylimits import divide
from gpufleet.keyspace import Keyspace, encode
from gpufleet.keyspace.records import KeyDemand, KeyShare, KeySharesRecord, NodeRecord

from .election import Election

log = structlog.get_logger("coordinator.keyshare_loop")

MIN_MOVE = 0.05  # a share moving less than 5 % of itself changes no decision worth a write
REFRESH_S = 60.0


def divide_all(records: dict[str, NodeRecord]) -> dict[str, KeyShare]:
    """Each limited key's division among the entry nodes (the nodes with records). Pure."""
    by_key: dict[str, dict[str, KeyDemand]] = {}
    for node, rec in records.items():
        for key, demand in rec.key_demand.items():
            by_key.setdefault(key, {})[node] = demand
    out = {}
    for key, demands in sorted(by_key.items()):
        busy, idle = divide(demands, len(records))
        out[key] = KeyShare(nodes={n: round(s, 4) for n, s in sorted(busy.items())}, idle=round(idle, 6))
    return out


def moved(old: dict[str, KeyShare], new: dict[str, KeyShare]) -> bool:
    """Would writing ``new`` over ``old`` change a node's share by more than MIN_MOVE of it?"""
    if old.keys() != new.keys():
        return True
    for key, share in new.items():
        before = old[key]
        if before.nodes.keys() != share.nodes.keys():
            return True
        pairs = [(before.idle, share.idle), *((before.nodes[n], s) for n, s in share.nodes.items())]
        if any(abs(a - b) > MIN_MOVE * max(a, b) for a, b in pairs):
            return True
    return False


class KeyShareController:
    def __init__(self, keys: Keyspace, election: Election) -> None:
        self.keys = keys
        self.election = election
        self._written: dict[str, KeyShare] | None = None
        self._written_nodes = 0
        self._written_at = 0.0

    def start_term(self) -> None:
        self._written, self._written_nodes, self._written_at = None, 0, 0.0

    async def step(self, records: dict[str, NodeRecord], epoch: int, now: float) -> bool:
        """Write the division if it moved (or is due). True when something was written."""
        shares = divide_all(records)
        due = now - self._written_at >= REFRESH_S
        if self._written is not None and not due and not moved(self._written, shares):
            if len(records) == self._written_nodes or not shares:
                return False
        rec = KeySharesRecord(epoch=epoch, updated_at=time.time(), entry_nodes=len(records), keys=shares)
        await self.election.guarded_txn([Op.put(self.keys.keyshares, encode(rec))])
        if self._written is not None and self._written.keys() != shares.keys():
            log.info("API key shares: keys divided changed", keys=sorted(shares))
        self._written, self._written_nodes, self._written_at = shares, len(records), now
        return True
