"""Utilization smoothing for what the agent reports.

NVML's utilization is the share of its last sample period (1/6 s to 1 s) in which a kernel
ran. Under serving traffic it jumps between 0 and 100 from one 5 s probe to the next, which
would make routing weights flap and, in cluster mode, turn the "±10 points" publish rule into
a write per probe. The node record carries an exponentially weighted moving average instead;
``alpha`` = 1 turns smoothing off.
"""

from __future__ import annotations

import msgspec

from gpufleet.keyspace.records import GpuRecord


class UtilizationSmoother:
    def __init__(self, alpha: float = 0.3) -> None:
        self.alpha = alpha
        self._avg: dict[str, float] = {}

    def apply(self, gpus: list[GpuRecord]) -> list[GpuRecord]:
        out = []
        for g in gpus:
            raw = g.utilization_percent
            if raw is None:
                out.append(g)
                continue
            prev = self._avg.get(g.uuid)
            avg = raw if prev is None else prev + self.alpha * (raw - prev)
            self._avg[g.uuid] = avg
            out.append(msgspec.structs.replace(g, utilization_percent=round(avg, 1)))
        return out
