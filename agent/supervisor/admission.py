"""GPU-memory admission: may this instance start on these GPUs now?

Two rules, both pure. The *plan* rule (config time) keeps the fractions on one GPU under the
budget. The *measured* rule (start time) asks NVML: the GPU's free memory, minus what instances
that are still loading have been promised, must cover ``fraction × total``. vLLM makes the same
check itself, but only after minutes of start-up and with an error in its own log; refusing
here names the instances involved at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from gpufleet.keyspace.records import GpuRecord

GIB = 1024**3


@dataclass(frozen=True)
class Claim:
    """Memory an instance holds or has been promised on each of its GPUs."""

    instance: str
    gpus: tuple[int, ...]
    fraction: float


def fmt_gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def check_admission(
    candidate: Claim,
    gpus: Mapping[int, GpuRecord],
    pending: Iterable[Claim] = (),
    holding: Iterable[Claim] = (),
    budget: float = 0.95,
) -> str | None:
    """Return None if ``candidate`` fits, else a message naming the GPU and the instances on it.

    ``pending``: started but not yet loaded (their memory may not show in NVML yet).
    ``holding``: running and loaded (NVML already counts their memory); only named in messages
    and counted against the budget.
    """
    pending = list(pending)
    holding = list(holding)
    for g in candidate.gpus:
        gpu = gpus.get(g)
        if gpu is None:
            return f"GPU {g} does not exist on this host (found {sorted(gpus)})"
        if gpu.lost:
            return f"GPU {g} ({gpu.name}) is lost"
        others = [c for c in pending + holding if g in c.gpus and c.instance != candidate.instance]
        planned = sum(c.fraction for c in others) + candidate.fraction
        names = ", ".join(f"{c.instance} ({c.fraction:g})" for c in others) or "none"
        if planned > budget + 1e-9:
            return (
                f"GPU {g} over-committed: {candidate.instance} ({candidate.fraction:g}) with {names} "
                f"sums to {planned:.2f} > budget {budget:g}"
            )
        if gpu.memory_total_bytes is None or gpu.memory_free_bytes is None:
            return f"GPU {g}: memory could not be read ({gpu.errors.get('memory', 'unknown error')})"
        need = candidate.fraction * gpu.memory_total_bytes
        promised = sum(c.fraction for c in pending if g in c.gpus and c.instance != candidate.instance)
        free = gpu.memory_free_bytes - promised * gpu.memory_total_bytes
        if need > free:
            return (
                f"GPU {g} has {fmt_gib(max(free, 0))} free (after instances still loading: "
                f"{', '.join(c.instance for c in pending if g in c.gpus) or 'none'}), "
                f"{candidate.instance} needs {fmt_gib(need)} ({candidate.fraction:g} of "
                f"{fmt_gib(gpu.memory_total_bytes)}); instances on this GPU: {names}"
            )
    return None
