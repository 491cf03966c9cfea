"""Prometheus metrics of the mutator, in a registry of its own (one per app, so tests that
build several apps in one process do not share counters)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class EndpointMetrics:
    """The request counter and latency histogram of one endpoint, its children bound once.

    Looking a labelled child up costs a lock and a dict per call, which the hot path
    would pay on every request; the usual answers' children are therefore made here.
    """

    __slots__ = ("_counted", "_path", "_requests", "observe")

    def __init__(self, requests: Counter, latency: Histogram, path: str) -> None:
        """Bind ``path``'s children of ``requests`` and ``latency``."""
        self._requests = requests
        self._path = path
        self.observe: Callable[[float], None] = latency.labels(path).observe
        """Record one request's duration in seconds."""
        # Made now, so /metrics shows these series (at 0) before the first request.
        self._counted = {status: requests.labels(path, str(status)) for status in (200, 503)}

    def count(self, status: int) -> None:
        """Count one request answered (or ended) with ``status``."""
        (self._counted.get(status) or self._requests.labels(self._path, str(status))).inc()


class MutatorMetrics:
    """What the mutator counts; one instance per app."""

    def __init__(self, paths: Iterable[str]) -> None:
        """The metrics, with an :class:`EndpointMetrics` for each of ``paths``."""
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mutator_requests",
            "Requests by endpoint and status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "mutator_request_seconds",
            "Request latency",
            ["endpoint"],
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        self.produce_errors = Counter(
            "mutator_produce_errors",
            "Records Kafka did not acknowledge",
            ["topic"],
            registry=self.registry,
        )
        self.replacements = Counter(
            "mutator_producer_replacements",
            "Kafka producers replaced by a fresh one (a new idempotence session) because they "
            "could write no more",
            registry=self.registry,
        )
        self.endpoints = {
            path: EndpointMetrics(self.requests, self.latency, path) for path in paths
        }
        """Each endpoint's metrics, by path."""
