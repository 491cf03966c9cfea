"""Prometheus metrics of the sellable service, in a registry of its own."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass
class ServiceMetrics:
    """What the writer and the API count; one instance per process (or per test)."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.written = Counter(
            "service_rows_written",
            "Sellable inventory rows upserted (or deleted) in Cassandra",
            registry=r,
        )
        self.results_written = Counter(
            "service_reservation_results_written",
            "Reservation results upserted into Cassandra (a duplicate of a stored result "
            "too: its upsert changes nothing)",
            registry=r,
        )
        self.undecodable = Counter(
            "service_undecodable_records", "Records skipped as undecodable", registry=r
        )
        self.write_failures = Counter(
            "service_write_failures", "Batches Cassandra refused (then retried)", registry=r
        )
        self.commit_failures = Counter(
            "service_commit_failures",
            "Offset commits the broker refused (the records are read again if need be)",
            registry=r,
        )
        self.writer_restarts = Counter(
            "service_writer_restarts",
            "Times the writer replaced its consumer after an unexpected error",
            registry=r,
        )
        self.write_seconds = Histogram(
            "service_write_seconds", "Time to write one consumed batch", registry=r
        )
        self.lag = Gauge(
            "service_lag_records",
            "Records behind the end of the topic, per topic consumed and partition",
            ["topic", "partition"],
            registry=r,
            multiprocess_mode="mostrecent",  # only the writer process sets it
        )
        self.get_seconds = Histogram(
            "service_get_seconds",
            "Latency of GET /inventory/locations/{location}/skus/{sku}",
            registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
