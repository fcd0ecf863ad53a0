"""Prometheus metrics: per-role counters and the store's gauges, on loopback.

Each daemon has its own :class:`prometheus_client.CollectorRegistry` (never
the library's global one), so several daemons in one test process do not
share numbers.  Roles ask :class:`Metrics` for counters by role and name;
the names come out as ``narsuite_<role>_<name>_total``.  Store gauges are
read at scrape time from the store itself, so the packet path pays nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.twisted import MetricsResource
from twisted.application import internet, service
from twisted.web.resource import Resource
from twisted.web.server import Site

from narsuite import __version__

if TYPE_CHECKING:
    from narsuite.store import Store

__all__ = ["Metrics", "StoreCollector", "make_metrics_service"]

# The *_created series double every counter for no use to an operator.
disable_created_metrics()


class Metrics:
    """The daemon's metric registry and a factory for role metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._made: dict[str, object] = {}
        info = Gauge("narsuite_build_info", "narsuite version", ["version"], registry=self.registry)
        info.labels(__version__).set(1)

    def _name(self, role: str, name: str) -> str:
        return f"narsuite_{role}_{name}"

    def counter(self, role: str, name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
        """``narsuite_<role>_<name>_total``; the same object when asked twice."""
        full = self._name(role, name)
        made = self._made.get(full)
        if made is None:
            made = self._made[full] = Counter(full, doc, list(labels), registry=self.registry)
        assert isinstance(made, Counter), f"{full} exists as a {type(made).__name__}"
        return made

    def gauge(self, role: str, name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
        full = self._name(role, name)
        made = self._made.get(full)
        if made is None:
            made = self._made[full] = Gauge(full, doc, list(labels), registry=self.registry)
        assert isinstance(made, Gauge), f"{full} exists as a {type(made).__name__}"
        return made

    def histogram(self, role: str, name: str, doc: str, labels: Sequence[str] = (),
                  buckets: Iterable[float] | None = None) -> Histogram:
        full = self._name(role, name)
        made = self._made.get(full)
        if made is None:
            made = self._made[full] = Histogram(
                full, doc, list(labels), registry=self.registry,
                buckets=tuple(buckets) if buckets is not None else Histogram.DEFAULT_BUCKETS)
        assert isinstance(made, Histogram), f"{full} exists as a {type(made).__name__}"
        return made

    def watch_counters(self, role: str, name: str, doc: str, label: str,
                       read: Callable[[], dict[str, float]]) -> None:
        """Expose a role's plain-dict counters as ``narsuite_<role>_<name>_total{<label>=...}``.

        The data plane increments ints in a dict (tens of ns); Prometheus reads
        them at scrape time, so the packet path never touches the client library.
        """
        self.registry.register(_DictCollector(self._name(role, name), doc, label, read))

    def watch_store(self, store: Store) -> None:
        self.registry.register(StoreCollector(store))

    def watch_udp(self, read: Callable[[], dict[str, dict[str, int]]]) -> None:
        """The shared UDP ports' own counters (``UDPPorts.stats``) as
        ``narsuite_udp_datagrams_total{counter="short",port="*:500"}``: datagrams each
        handler took, and those nobody took (short, unclaimed) or whose handler failed."""
        self.registry.register(_UdpCollector(read))

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class StoreCollector:
    """Reads the store's sizes and the backend's write statistics at scrape time."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def describe(self) -> list:
        return []

    def collect(self):
        records = GaugeMetricFamily("narsuite_store_records", "Records in the store", labels=["kind"])
        for spec in self.store.kinds():
            records.add_metric([spec.name], self.store.count(spec.name))
        yield records
        leased = GaugeMetricFamily("narsuite_store_pool_leased", "Addresses leased", labels=["pool"])
        size = GaugeMetricFamily("narsuite_store_pool_size", "Addresses in the pool", labels=["pool"])
        for name in self.store.pools():
            used, total = self.store.pool_usage(name)
            leased.add_metric([name], used)
            size.add_metric([name], total)
        yield leased
        yield size
        for stat, value in self.store.stats.items():
            c = CounterMetricFamily(f"narsuite_store_{stat}", f"Store {stat}")
            c.add_metric([], value)
            yield c
        b = self.store.backend.stats()
        if b:
            yield _gauge("narsuite_store_writes_queued", "Changes waiting for the next commit", b["queued"])
            c = CounterMetricFamily("narsuite_store_commits", "Backend commits")
            c.add_metric([], b["commits"])
            yield c
            c = CounterMetricFamily("narsuite_store_rows_written", "Rows written by the backend")
            c.add_metric([], b["rows_written"])
            yield c
            yield _gauge("narsuite_store_last_commit_seconds", "Duration of the last commit",
                         b["last_commit_seconds"])


class _DictCollector:
    def __init__(self, name: str, doc: str, label: str, read: Callable[[], dict[str, float]]) -> None:
        self.name, self.doc, self.label, self.read = name, doc, label, read

    def describe(self) -> list:
        return []

    def collect(self):
        family = CounterMetricFamily(self.name, self.doc, labels=[self.label])
        for key, value in sorted(self.read().items()):
            family.add_metric([key], value)
        yield family


class _UdpCollector:
    def __init__(self, read: Callable[[], dict[str, dict[str, int]]]) -> None:
        self.read = read

    def describe(self) -> list:
        return []

    def collect(self):
        family = CounterMetricFamily("narsuite_udp_datagrams", "Datagrams on the shared UDP ports, by what "
                                     "became of them", labels=["port", "counter"])
        for port, counters in self.read().items():
            for name, value in sorted(counters.items()):
                family.add_metric([port, name], value)
        yield family


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], value)
    return g


def make_metrics_service(metrics: Metrics, listen: str, port: int) -> service.Service:
    """HTTP on ``listen:port`` serving ``/metrics`` (and nothing else)."""
    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry=metrics.registry))
    site = Site(root)
    site.displayTracebacks = False
    svc = internet.TCPServer(port, site, interface=listen)
    svc.setName("metrics")
    return svc
