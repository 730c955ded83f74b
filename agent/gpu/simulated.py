"""Declared GPUs for hosts without any (demos, CI): chosen only by ``[gpu] source = "simulated"``.

Memory mirrors what NVML would show: a baseline "used by someone else" plus whatever the
supervisor says its simulated instances hold, capped at the total. Script steps change the state
at fixed times after :meth:`SimulatedSource.open`; they are applied when sampled, against the
injected clock, so tests need no sleeping.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.config import GpuScriptStep, SimulatedGpu
from agent.gpu.topology import published, simulated_links
from gpufleet.gpuclasses import classify_gpu
from gpufleet.keyspace.records import GpuRecord

GIB = 1024**3


def simulated_uuid(name: str, index: int) -> str:
    # Deterministic, so a restarted agent reports the same GPUs.
    digest = hashlib.sha256(f"{name}\0{index}".encode()).hexdigest()[:8]
    return f"GPU-sim-{digest}-{index}"


@dataclass
class _SimGpu:
    index: int
    uuid: str
    name: str
    gpu_class: str
    total_bytes: int
    baseline_used_bytes: int
    temperature_c: float
    utilization_percent: float
    power_w: float
    links: list[int]  # declared interconnect (agent/gpu/topology.py); [] unknown
    lost: bool = False
    pending: list[GpuScriptStep] = field(default_factory=list)  # not yet applied, by at_s


class SimulatedSource:
    kind = "simulated"

    def __init__(
        self,
        gpus: list[SimulatedGpu],
        *,
        overrides: dict[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._clock = clock
        self._opened_at: float | None = None
        self._owners: dict[str, dict[int, int]] = {}  # instance -> {gpu index: bytes}
        links = published(simulated_links(gpus))
        self._gpus = [
            _SimGpu(
                index=i,
                uuid=g.uuid or simulated_uuid(g.name, i),
                name=g.name,
                gpu_class=classify_gpu(g.name, overrides),
                total_bytes=int(g.memory_total_gib * GIB),
                baseline_used_bytes=int(g.memory_used_gib * GIB),
                temperature_c=g.temperature_c,
                utilization_percent=g.utilization_percent,
                power_w=g.power_w,
                links=links[i],
                pending=sorted(g.script, key=lambda s: s.at_s),
            )
            for i, g in enumerate(gpus)
        ]

    def open(self) -> None:
        self._opened_at = self._clock()

    def close(self) -> None:
        pass

    async def sample(self) -> list[GpuRecord]:
        if self._opened_at is None:
            raise RuntimeError("SimulatedSource.sample() before open()")
        elapsed = self._clock() - self._opened_at
        for gpu in self._gpus:
            while gpu.pending and gpu.pending[0].at_s <= elapsed:
                step = gpu.pending.pop(0)
                self._apply(
                    gpu,
                    temperature_c=step.temperature_c,
                    utilization_percent=step.utilization_percent,
                    power_w=step.power_w,
                    memory_used_gib=step.memory_used_gib,
                    lost=step.lost,
                )
        return [self._record(g) for g in self._gpus]

    def set_state(
        self,
        index: int,
        *,
        temperature_c: float | None = None,
        utilization_percent: float | None = None,
        power_w: float | None = None,
        memory_used_gib: float | None = None,
        lost: bool | None = None,
    ) -> None:
        """Change a GPU now (admin API, tests). ``None`` leaves a field as it is."""
        gpu = self._gpu(index)
        if utilization_percent is not None and not 0 <= utilization_percent <= 100:
            raise ValueError(f"utilization_percent must be within 0..100, not {utilization_percent}")
        if power_w is not None and power_w < 0:
            raise ValueError(f"power_w must be >= 0, not {power_w}")
        if memory_used_gib is not None and not 0 <= memory_used_gib * GIB <= gpu.total_bytes:
            limit = gpu.total_bytes / GIB
            raise ValueError(f"memory_used_gib must be within 0..{limit:g} on GPU {index}, not {memory_used_gib}")
        self._apply(
            gpu,
            temperature_c=temperature_c,
            utilization_percent=utilization_percent,
            power_w=power_w,
            memory_used_gib=memory_used_gib,
            lost=lost,
        )

    def set_process_memory(self, owner: str, per_gpu_bytes: dict[int, int]) -> None:
        """What ``owner`` (an instance) holds on each GPU; replaces its previous amounts."""
        for index, nbytes in per_gpu_bytes.items():
            self._gpu(index)
            if nbytes < 0:
                raise ValueError(f"memory for {owner!r} on GPU {index} must be >= 0, not {nbytes}")
        self._owners[owner] = dict(per_gpu_bytes)

    def clear_process_memory(self, owner: str) -> None:
        self._owners.pop(owner, None)

    # --- internals ------------------------------------------------------------------------------

    def _gpu(self, index: int) -> _SimGpu:
        if not 0 <= index < len(self._gpus):
            raise IndexError(f"no simulated GPU {index} ({len(self._gpus)} declared)")
        return self._gpus[index]

    @staticmethod
    def _apply(
        gpu: _SimGpu,
        *,
        temperature_c: float | None,
        utilization_percent: float | None,
        power_w: float | None,
        memory_used_gib: float | None,
        lost: bool | None,
    ) -> None:
        if temperature_c is not None:
            gpu.temperature_c = temperature_c
        if utilization_percent is not None:
            gpu.utilization_percent = utilization_percent
        if power_w is not None:
            gpu.power_w = power_w
        if memory_used_gib is not None:
            gpu.baseline_used_bytes = int(memory_used_gib * GIB)
        if lost is not None:
            gpu.lost = lost

    def _record(self, gpu: _SimGpu) -> GpuRecord:
        ident = {"index": gpu.index, "uuid": gpu.uuid, "name": gpu.name, "gpu_class": gpu.gpu_class}
        if gpu.lost:
            return GpuRecord(**ident, lost=True, errors={"device": "GPU is lost"}, links=list(gpu.links))
        held = sum(per_gpu.get(gpu.index, 0) for per_gpu in self._owners.values())
        # A script step may declare more than the total; a real GPU cannot report that.
        used = min(gpu.baseline_used_bytes + held, gpu.total_bytes)
        return GpuRecord(
            **ident,
            memory_total_bytes=gpu.total_bytes,
            memory_used_bytes=used,
            memory_free_bytes=gpu.total_bytes - used,
            utilization_percent=float(gpu.utilization_percent),
            temperature_celsius=float(gpu.temperature_c),
            power_watts=float(gpu.power_w),
            links=list(gpu.links),
        )
