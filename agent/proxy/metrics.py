"""Proxy metrics, registered in the agent's own registry (not prometheus_client's global one)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from .cache import ResponseCache
from .stats import ProxyStats

# Latency buckets from 1 ms to 10 min: LLM requests span five orders of magnitude.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TTFB_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ProxyMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        # Per request: plain counters, folded into Prometheus families at scrape time
        # (_Requests); prometheus_client's locks and label lookups were a measurable share of
        # the proxy's CPU per request.
        self.done = _Requests()
        registry.register(self.done)
        self.in_flight = self.done.in_flight  # by model: requests being proxied
        self._upstream_series(registry)
        self._refusal_series(registry)

    def _upstream_series(self, registry: CollectorRegistry) -> None:
        """What happened upstream: retries, failed attempts, ejections."""
        self.retries = Counter(
            "gpu_agent_proxy_retries",
            "Retries on another instance before the first byte.",
            ["model"],
            registry=registry,
        )
        self.upstream_errors = Counter(
            "gpu_agent_proxy_upstream_errors",
            "Failed upstream attempts by kind (connect, status_5xx, status_429, timeout, midstream, "
            "instance_down: it left rotation under the attempt, node_down).",
            ["model", "instance", "kind"],
            registry=registry,
        )
        self.ejections = Counter(
            "gpu_agent_proxy_ejections",
            "Instances taken out of rotation by passive health (consecutive gateway failures).",
            ["model", "instance"],
            registry=registry,
        )

    def _refusal_series(self, registry: CollectorRegistry) -> None:
        """Requests answered without an upstream: refused, or degraded."""
        self.rejected = Counter(
            "gpu_agent_proxy_rejected",
            "Requests refused before any upstream (by reason).",
            ["reason"],
            registry=registry,
        )
        self.degraded = Counter(
            "gpu_agent_proxy_degraded",
            "Requests answered by degradation: cache (level 1+), fallback (level 2), static (level 3).",
            ["kind"],
            registry=registry,
        )
        self.degradation_level = Gauge(
            "gpu_agent_degradation_level",
            "Degradation level this proxy applies (0 normal, 1 cache, 2 fallback model, 3 static answer).",
            registry=registry,
        )

    def watch_state(
        self, stats: ProxyStats, cache: Callable[[], ResponseCache], queued: Callable[[], dict[str, int]]
    ) -> None:
        """The response cache's hits and misses (the proxy's stats), its size, and each limited
        model's queue, read at scrape time (the proxy keeps plain counters on its hot path)."""
        self.registry.register(_State(stats, cache, queued))

    def watch_ejected(self, snapshot: Callable[[], list[tuple[str, str, bool]]]) -> None:
        """gpu_agent_proxy_instance_ejected, read at scrape time from (model, instance, ejected)."""
        self.registry.register(_Ejected(snapshot))

    def note(self, model: str, code: int, duration_s: float, ttfb_s: float | None) -> None:
        """A request ended: counted with the next batch (``_Requests.fold``)."""
        self.done.note(model, code, duration_s, ttfb_s)


_HELP = {
    "gpu_agent_proxy_request_duration_seconds": "Time from request received to response complete.",
    "gpu_agent_proxy_time_to_first_byte_seconds": "Time from request received to the upstream's response headers.",
}


class _Histogram:
    """Bucket counts (not cumulative) and a sum: bisect and two additions per observation."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def family_buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), total))
        return out


# Requests noted and not yet counted: counted in one go when this many wait, and at every scrape.
FOLD_AT = 256


class _Requests(Collector):
    """gpu_agent_proxy_in_flight_requests{model}, gpu_agent_proxy_requests_total{model,code} and
    the duration and time-to-first-byte histograms{model}: plain counters, families at scrape time.

    A request that ends is noted (a tuple appended) and counted with the others noted since, in
    one loop (``fold``): at ``FOLD_AT`` and before each scrape, so a scrape sees every request
    that ended before it. Counting each request as it ended cost several times as much as the
    same counting done in a batch (bench/proxy_floor.py: about 5 µs against 1): between two
    requests the kernel's network path runs and the counters' code and data are out of the
    CPU's caches again."""

    def __init__(self) -> None:
        self.in_flight: dict[str, int] = {}  # by model: requests being proxied
        self._requests: dict[tuple[str, int], int] = {}
        self.duration: dict[str, _Histogram] = {}
        self.ttfb: dict[str, _Histogram] = {}
        self._noted: list[tuple[str, int, float, float | None]] = []

    def note(self, model: str, code: int, duration_s: float, ttfb_s: float | None) -> None:
        noted = self._noted
        noted.append((model, code, duration_s, ttfb_s))
        if len(noted) >= FOLD_AT:
            self.fold()

    @property
    def requests(self) -> dict[tuple[str, int], int]:
        """Requests by (model, code), every noted one counted."""
        self.fold()
        return self._requests

    def fold(self) -> None:
        noted, self._noted = self._noted, []
        for model, code, duration_s, ttfb_s in noted:
            self.observe(model, code, duration_s, ttfb_s)

    def observe(self, model: str, code: int, duration_s: float, ttfb_s: float | None) -> None:
        key = (model, code)
        requests = self._requests
        requests[key] = requests.get(key, 0) + 1
        d = self.duration.get(model)
        if d is None:
            d = self.duration[model] = _Histogram(DURATION_BUCKETS)
        d.observe(duration_s)
        if ttfb_s is not None:
            t = self.ttfb.get(model)
            if t is None:
                t = self.ttfb[model] = _Histogram(TTFB_BUCKETS)
            t.observe(ttfb_s)

    def collect(self) -> Iterator[Metric]:
        self.fold()
        in_flight = GaugeMetricFamily("gpu_agent_proxy_in_flight_requests", "Requests being proxied.", labels=["model"])
        for model, n in list(self.in_flight.items()):
            in_flight.add_metric([model], n)
        yield in_flight
        requests = CounterMetricFamily(
            "gpu_agent_proxy_requests", "Proxied requests by model and HTTP status.", labels=["model", "code"]
        )
        for (model, code), n in list(self._requests.items()):
            requests.add_metric([model, str(code)], n)
        yield requests
        for name, series in (
            ("gpu_agent_proxy_request_duration_seconds", self.duration),
            ("gpu_agent_proxy_time_to_first_byte_seconds", self.ttfb),
        ):
            h = HistogramMetricFamily(name, _HELP[name], labels=["model"])
            for model, hist in list(series.items()):
                h.add_metric([model], hist.family_buckets(), hist.sum)
            yield h


class _Ejected(Collector):
    def __init__(self, snapshot: Callable[[], list[tuple[str, str, bool]]]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        g = GaugeMetricFamily(
            "gpu_agent_proxy_instance_ejected",
            "1 while passive health keeps the instance out of rotation (ejected, or half-open until a trial succeeds).",
            labels=["model", "instance"],
        )
        for model, instance, ejected in self.snapshot():
            g.add_metric([model, instance], 1.0 if ejected else 0.0)
        yield g


class _State(Collector):
    def __init__(
        self, stats: ProxyStats, cache: Callable[[], ResponseCache], queued: Callable[[], dict[str, int]]
    ) -> None:
        self.stats = stats
        self.cache = cache
        self.queued = queued

    def collect(self) -> Iterator[Metric]:
        c = self.cache()
        lookups = CounterMetricFamily(
            "gpu_agent_proxy_cache_lookups",
            "Response cache lookups (degradation level 1 and up) by result.",
            labels=["result"],
        )
        lookups.add_metric(["hit"], self.stats.cache_hits)
        lookups.add_metric(["miss"], self.stats.cache_misses)
        yield lookups
        yield GaugeMetricFamily("gpu_agent_proxy_cache_entries", "Responses held by the cache.", value=len(c))
        yield GaugeMetricFamily("gpu_agent_proxy_cache_bytes", "Bytes held by the cache.", value=c.bytes)
        queued = GaugeMetricFamily(
            "gpu_agent_proxy_queued_requests",
            "Requests waiting for a slot under a model's [proxy.limits] max_concurrency.",
            labels=["model"],
        )
        for model, n in self.queued().items():
            queued.add_metric([model], n)
        yield queued
