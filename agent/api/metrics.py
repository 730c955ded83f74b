"""Prometheus exposition of the agent's state, built at scrape time from the node record.

Names follow Prometheus conventions: ``gpu_agent_`` prefix, base units in the name
(``_celsius``, ``_bytes``, ``_ratio``, ``_watts``, ``_seconds``), counters end in ``_total``.
Gauges are derived from one snapshot per scrape, so the numbers in a scrape agree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.supervisor.supervision_policy import InstanceState
from gpufleet.keyspace.records import NodeRecord


class NodeCollector(Collector):
    def __init__(self, snapshot: Callable[[], NodeRecord]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        rec = self.snapshot()  # one snapshot per scrape, so the families agree
        yield from _gpu_metrics(rec)
        yield from _instance_metrics(rec)
        yield from _agent_metrics(rec)


def _gpu_metrics(rec: NodeRecord) -> Iterator[Metric]:
    gl = ["gpu", "uuid", "gpu_class"]
    temp = GaugeMetricFamily("gpu_agent_gpu_temperature_celsius", "GPU temperature.", labels=gl)
    util = GaugeMetricFamily("gpu_agent_gpu_utilization_ratio", "GPU utilization, 0..1.", labels=gl)
    mem_total = GaugeMetricFamily("gpu_agent_gpu_memory_total_bytes", "GPU memory size.", labels=gl)
    mem_used = GaugeMetricFamily("gpu_agent_gpu_memory_used_bytes", "GPU memory in use.", labels=gl)
    power = GaugeMetricFamily("gpu_agent_gpu_power_watts", "GPU power draw.", labels=gl)
    lost = GaugeMetricFamily("gpu_agent_gpu_lost", "1 when NVML reports the GPU as lost.", labels=gl)
    errs = GaugeMetricFamily(
        "gpu_agent_gpu_probe_errors", "Fields that could not be read in the last sample.", labels=gl
    )
    for g in rec.gpus:
        lv = [str(g.index), g.uuid, g.gpu_class]
        for fam, val in (
            (temp, g.temperature_celsius),
            (util, None if g.utilization_percent is None else g.utilization_percent / 100.0),
            (mem_total, g.memory_total_bytes),
            (mem_used, g.memory_used_bytes),
            (power, g.power_watts),
        ):
            if val is not None:
                fam.add_metric(lv, float(val))
        lost.add_metric(lv, 1.0 if g.lost else 0.0)
        errs.add_metric(lv, float(len(g.errors)))
    yield from (temp, util, mem_total, mem_used, power, lost, errs)


def _instance_metrics(rec: NodeRecord) -> Iterator[Metric]:
    il = ["instance", "model", "backend"]
    state = GaugeMetricFamily("gpu_agent_instance_state", "1 for the instance's current state.", labels=[*il, "state"])
    ready = GaugeMetricFamily("gpu_agent_instance_ready", "1 when the instance serves traffic.", labels=il)
    restarts = CounterMetricFamily("gpu_agent_instance_restarts", "Restarts after failures.", labels=il)
    health = GaugeMetricFamily("gpu_agent_instance_health_ratio", "Share of recent probes that passed.", labels=il)
    running = GaugeMetricFamily("gpu_agent_instance_requests_running", "Requests the backend is running.", labels=il)
    waiting = GaugeMetricFamily("gpu_agent_instance_requests_waiting", "Requests queued in the backend.", labels=il)
    kv = GaugeMetricFamily("gpu_agent_instance_kv_cache_usage_ratio", "Backend KV-cache usage, 0..1.", labels=il)
    since = GaugeMetricFamily(
        "gpu_agent_instance_state_since_seconds", "Unix time of the last state change.", labels=il
    )
    for i in rec.instances:
        lv = [i.name, i.model, i.backend]
        for s in InstanceState:
            state.add_metric([*lv, s.value], 1.0 if i.state == s.value else 0.0)
        ready.add_metric(lv, 1.0 if i.state == "READY" else 0.0)
        restarts.add_metric(lv, float(i.restarts))
        health.add_metric(lv, i.health_ratio)
        since.add_metric(lv, i.state_since)
        if i.load is not None:
            for fam, val in (
                (running, i.load.requests_running),
                (waiting, i.load.requests_waiting),
                (kv, i.load.kv_cache_usage_ratio),
            ):
                if val is not None:
                    fam.add_metric(lv, val)
    yield from (state, ready, restarts, health, since, running, waiting, kv)


def _agent_metrics(rec: NodeRecord) -> Iterator[Metric]:
    up = GaugeMetricFamily("gpu_agent_ready", "1 when the agent reports ready (/readyz).")
    up.add_metric([], 1.0 if rec.ready else 0.0)
    start = GaugeMetricFamily("gpu_agent_start_time_seconds", "Unix time the agent started.")
    start.add_metric([], rec.started_at)
    info = GaugeMetricFamily(
        "gpu_agent_build_info", "Agent version and mode.", labels=["version", "mode", "gpu_source"]
    )
    info.add_metric([rec.agent_version, rec.mode, rec.gpu_source], 1.0)
    yield from (up, start, info)


class LogDropCollector(Collector):
    """Log lines lost to failed writes (a full or failing disk): the agent's own log and each
    instance's output. Logging drops rather than blocks or raises (logsetup.py, process.py)."""

    def __init__(
        self, agent_dropped: Callable[[], int], instance_dropped: Callable[[], list[tuple[list[str], int]]]
    ) -> None:
        self.agent_dropped = agent_dropped
        self.instance_dropped = instance_dropped  # ([instance, model, backend], lines) each

    def collect(self) -> Iterator[Metric]:
        own = CounterMetricFamily("gpu_agent_log_lines_dropped", "Agent log lines dropped because writing failed.")
        own.add_metric([], float(self.agent_dropped()))
        inst = CounterMetricFamily(
            "gpu_agent_instance_log_lines_dropped",
            "Model-server output lines dropped because the instance log could not be written.",
            labels=["instance", "model", "backend"],
        )
        for labels, n in self.instance_dropped():
            inst.add_metric(labels, float(n))
        yield from (own, inst)


def make_registry(snapshot: Callable[[], NodeRecord]) -> CollectorRegistry:
    # A registry per agent, not the global one: tests run several agents in one process.
    reg = CollectorRegistry(auto_describe=False)
    reg.register(NodeCollector(snapshot))
    return reg
