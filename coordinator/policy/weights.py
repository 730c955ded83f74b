"""Endpoint weights from GPU class, load, temperature and probe health: the dynamic weights of a
production qwen3:32b gateway (docs/sources.md, Clawdbot), with its constants.

    weight = int(base[class] × load_factor × temp_factor × health_score)
    load_factor  = 1 − util/100 × 0.6
    temp_factor  = clamp(1 − (temp − 65)/30, 0.3, 1.0)
    health_score = health_ratio × 0.8 + 0.2
    above 85 °C:   weight ≤ int(0.3 × base)

Two decisions that go beyond the article's formula:

* ``temp_factor`` is capped at 1.0 (``temp_ceiling``). The article's formula has no cap, so a
  card at 35 °C would get twice the weight of one at 65 °C; but a GPU is cool mostly *because*
  it is idle, which the load factor already rewards, and without the cap temperature would
  outweigh the hardware class (an A10 at 20 °C would beat a loaded A100). Set
  ``temp_ceiling=float("inf")`` for the article's formula verbatim.
* Unknown telemetry (``None``, NaN) is read conservatively: utilization as 100 % (assume busy:
  the endpoint keeps a weight, only a smaller one) and temperature as ``temp_ref_c`` (neutral:
  an unreadable sensor should not eject a card; over-temperature is the health policy's job
  when the reading exists).

Pure functions: no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gpufleet.facts import HOT_GPU_C
from gpufleet.gpuclasses import BASE_WEIGHTS
from gpufleet.keyspace.records import InstanceRecord, NodeRecord

# The gateway article's A10 100, A100 220, H100 380 and every other class gpufleet recognises, from one measure
# (memory bandwidth; gpufleet/gpuclasses.py says how).
DEFAULT_BASE: dict[str, int] = dict(BASE_WEIGHTS)

# Class name used for an instance on a node that reports no GPU at all.
CPU_CLASS = "CPU"


@dataclass(frozen=True)
class WeightPolicy:
    base: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_BASE))
    default_base: int = 100  # classes the table does not name (UNKNOWN, an operator's own); logged
    util_factor: float = 0.6
    temp_ref_c: float = 65.0
    temp_span_c: float = 30.0
    temp_floor: float = 0.3
    temp_ceiling: float = 1.0  # see the module docstring
    health_floor: float = 0.2  # health_score = floor + (1 − floor) × health_ratio
    hot_c: float = HOT_GPU_C
    hot_cap: float = 0.3

    def __post_init__(self) -> None:
        if self.temp_span_c <= 0:
            raise ValueError(f"temp_span_c must be positive, not {self.temp_span_c}")


DEFAULT_WEIGHTS = WeightPolicy()


def endpoint_weight(
    gpu_class: str,
    util_percent: float | None,
    temp_c: float | None,
    health_ratio: float,
    policy: WeightPolicy = DEFAULT_WEIGHTS,
) -> int:
    """The article's weight for one endpoint; never negative.

    Runs for every endpoint on every tick, so the clamps are plain comparisons (builtin min/max
    calls cost more than the arithmetic). ``x != x`` is the NaN test: NaN compares false with
    everything, so it would slip through a clamp.
    """
    p = policy
    base = p.base.get(gpu_class, p.default_base)
    if util_percent is None or util_percent != util_percent or util_percent >= 100.0:
        util = 100.0
    elif util_percent <= 0.0:
        util = 0.0
    else:
        util = util_percent
    temp = p.temp_ref_c if temp_c is None or temp_c != temp_c else temp_c
    if health_ratio >= 1.0:
        ratio = 1.0
    elif health_ratio > 0.0:
        ratio = health_ratio
    else:
        ratio = 0.0  # also NaN

    load_factor = 1.0 - util / 100.0 * p.util_factor
    temp_factor = 1.0 - (temp - p.temp_ref_c) / p.temp_span_c
    if temp_factor > p.temp_ceiling:
        temp_factor = p.temp_ceiling
    if temp_factor < p.temp_floor:
        temp_factor = p.temp_floor
    health_score = p.health_floor + (1.0 - p.health_floor) * ratio
    weight = int(base * load_factor * temp_factor * health_score)
    if temp > p.hot_c:
        cap = int(p.hot_cap * base)
        if weight > cap:
            weight = cap
    return weight if weight > 0 else 0


def instance_telemetry(node: NodeRecord, inst: InstanceRecord) -> tuple[str, float | None, float | None]:
    """(gpu_class, utilization %, temperature °C) of the GPUs an instance runs on.

    Class: that of the instance's first GPU. Utilization: its busiest GPU (a GPU with an unknown
    value counts as 100 %, as in ``endpoint_weight``): a tensor-parallel replica waits for all
    its shards at every layer, so it runs at the pace of the slowest. Temperature: the hottest
    known GPU, ``None`` if none is known. A CPU-only instance (``gpus == []``) is of class ``CPU``
    (default base weight, no load, neutral temperature) whatever GPUs its node has: it competes
    with other CPU instances, never with the node's GPU generation.
    """
    gpus = node.gpus
    n = len(gpus)
    gpu_class: str | None = None
    count = 0
    util_max = 0.0
    temp: float | None = None
    for idx in inst.gpus:
        # GPUs are normally listed in index order, so position == index; search only if not.
        if 0 <= idx < n and gpus[idx].index == idx:
            g = gpus[idx]
        else:
            g = next((g for g in gpus if g.index == idx), None)
            if g is None:
                continue
        if gpu_class is None:
            gpu_class = g.gpu_class
        count += 1
        u = g.utilization_percent
        if u is None or u != u or u >= 100.0:
            util_max = 100.0
        elif u > util_max:
            util_max = u
        t = g.temperature_celsius
        if t is not None and t == t and (temp is None or t > temp):
            temp = t
    if gpu_class is None:
        if not inst.gpus:
            return CPU_CLASS, 0.0, None
        # The node no longer reports the instance's GPUs: unknown telemetry, the node's class.
        return (gpus[0].gpu_class if gpus else CPU_CLASS), None, None
    return gpu_class, util_max, temp


def instance_weight(node: NodeRecord, inst: InstanceRecord, policy: WeightPolicy = DEFAULT_WEIGHTS) -> int:
    """``endpoint_weight`` for an instance, from its GPUs on ``node`` and its own health_ratio."""
    gpu_class, util, temp = instance_telemetry(node, inst)
    return endpoint_weight(gpu_class, util, temp, inst.health_ratio, policy)
