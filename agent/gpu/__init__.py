"""GPU probe: where the agent's GPU facts come from, real (NVML) or declared (simulated).

The source is whatever ``[gpu] source`` says. If NVML cannot start, :func:`open_gpu_source`
raises :class:`GpuSourceUnavailable`; it never falls back to simulated GPUs, because an agent
advertising GPUs it does not have would get work scheduled onto nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from agent.config import GpuSection
from agent.gpu.nvml import GpuSourceUnavailable, NvmlSource
from agent.gpu.simulated import SimulatedSource
from gpufleet.gpuclasses import UNKNOWN, classify_gpu
from gpufleet.keyspace.records import GpuRecord


@runtime_checkable
class GpuSource(Protocol):
    kind: str  # "nvml" | "simulated"

    def open(self) -> None: ...

    async def sample(self) -> list[GpuRecord]:
        """One record per GPU, by index; unreadable fields are None with the reason in ``errors``."""
        ...

    def close(self) -> None: ...

    # The supervisor reports what its instances hold; only the simulated source uses it.
    def set_process_memory(self, owner: str, per_gpu_bytes: dict[int, int]) -> None: ...

    def clear_process_memory(self, owner: str) -> None: ...


def open_gpu_source(cfg: GpuSection, clock: Callable[[], float] = time.monotonic) -> GpuSource:
    """Build and open the configured source; raises :class:`GpuSourceUnavailable`."""
    source: GpuSource
    if cfg.source == "simulated":
        source = SimulatedSource(cfg.simulated, overrides=cfg.classes, clock=clock)
    else:
        source = NvmlSource(nvml_timeout_s=cfg.nvml_timeout_s, overrides=cfg.classes)
    source.open()
    return source


__all__ = [
    "UNKNOWN",
    "GpuSource",
    "GpuSourceUnavailable",
    "NvmlSource",
    "SimulatedSource",
    "classify_gpu",
    "open_gpu_source",
]
